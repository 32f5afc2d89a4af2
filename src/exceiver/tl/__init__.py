"""Tools that take a trained model explicitly (scanpy's `tl` style): label transfer, imputation,
in-silico perturbation, gene-gene dependencies, and evaluation against baselines (also
`exceiver.evaluate`). They need of a model only `exceiver.inference.CellModel` and read data
through its contract (`model.read`).

Imputed values and effects are on the log-normalised scale (log1p of counts scaled to 1e4 per
cell): the count decoder's expected expression, or model values mapped back through the scaler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exceiver.lazy import lazy_exports

if TYPE_CHECKING:
    from exceiver.tl.annotation import annotate
    from exceiver.evaluate.report import evaluate
    from exceiver.tl.dependency import GeneDependencies, attention_routes, gene_dependencies, plot_dependencies
    from exceiver.tl.imputation import impute
    from exceiver.tl.perturbation import perturb

_EXPORTS = {"GeneDependencies": "exceiver.tl.dependency", "annotate": "exceiver.tl.annotation",
            "attention_routes": "exceiver.tl.dependency",
            "evaluate": "exceiver.evaluate.report", "gene_dependencies": "exceiver.tl.dependency",
            "impute": "exceiver.tl.imputation", "perturb": "exceiver.tl.perturbation",
            "plot_dependencies": "exceiver.tl.dependency"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
