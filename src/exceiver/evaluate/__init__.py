"""Judging models: reconstruction, cell and gene embeddings, beside the baselines a model must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from exceiver.lazy import lazy_exports

if TYPE_CHECKING:
    from exceiver.evaluate.baselines import cell_baselines, log_normalised, pca_embedding
    from exceiver.evaluate.cells import knn_scores
    from exceiver.evaluate.report import evaluate

_EXPORTS = {"cell_baselines": "exceiver.evaluate.baselines", "evaluate": "exceiver.evaluate.report",
            "knn_scores": "exceiver.evaluate.cells", "log_normalised": "exceiver.evaluate.baselines",
            "pca_embedding": "exceiver.evaluate.baselines"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
