"""Gene names -> vocabulary ids, with errors that say which genes cannot be used and why."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exceiver.errors import ExceiverInputError, plain


def resolve_genes(model, genes: Sequence[str] | str, what: str = "genes") -> np.ndarray:
    """Vocabulary ids of `genes`; unknown genes, and genes that no training cell expressed (their
    embeddings are untrained, so predictions about them mean nothing), are refused."""
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise ExceiverInputError(f"no {what} given")
    duplicated = sorted({g for g in genes if genes.count(g) > 1})
    if duplicated:
        raise ExceiverInputError(f"{what} are listed more than once: {duplicated[:5]}")
    ids = model.vocab.ids(genes)
    unknown = [g for g, i in zip(genes, ids) if i < 0]
    if unknown:
        raise ExceiverInputError(
            f"{len(unknown)} of {len(genes)} {what} are not in the model's vocabulary of {len(model.vocab):,} "
            f"genes: {unknown[:5]} (vocabulary genes look like {plain(model.vocab.genes[:3])})")
    untrained = [g for g, i in zip(genes, ids) if not model.scaler.trained_genes[i]]
    if untrained:
        raise ExceiverInputError(
            f"{len(untrained)} {what} were never expressed in the model's training cells, so the model "
            f"knows nothing about them: {untrained[:5]}")
    return ids.astype(np.int64)
