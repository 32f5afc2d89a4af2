"""Count checks and the paper's value transform: normalise to 1e4 per cell, log1p, z-score per
gene (statistics fitted once, on training cells, zeros included), clip at 10, plus 1.

Everything here works on the non-zero entries of sparse counts: a dense cells x genes matrix is
never built.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from exceiver.errors import ExceiverInputError
from exceiver.vocab import CellCounts

log = logging.getLogger(__name__)

TARGET_SUM = 1e4
MAX_VALUE = 10.0
SHIFT = 1.0  # the paper shifts z-scores so that an average expression level is 1, not 0


def check_counts(cells: CellCounts, name: str = "dataset") -> None:
    """Refuse counts that are not finite or negative; warn on non-integers (not raw counts?)."""
    data = cells.counts.data
    bad = ~np.isfinite(data)
    if bad.any():
        raise ExceiverInputError(
            f"{name}: {int(bad.sum()):,} count entries are NaN or infinite; exceiver needs raw counts"
        )
    negative = data < 0
    if negative.any():
        raise ExceiverInputError(
            f"{name}: {int(negative.sum()):,} count entries are negative (min {data.min():.3g}); "
            "exceiver needs raw counts, not scaled or centred data (pass layer='counts' if the "
            "counts are in a layer)"
        )
    fractional = data != np.round(data)
    if fractional.any():
        example = data[np.flatnonzero(fractional)[0]]
        warnings.warn(
            f"{name}: {int(fractional.sum()):,} of {data.size:,} non-zero entries are not integers "
            f"(e.g. {example:.4g}); exceiver expects raw counts, and log-normalised input gives "
            "wrong values",
            stacklevel=2,
        )


def drop_empty_cells(cells: CellCounts, name: str = "dataset") -> CellCounts:
    """Cells with no counts in the vocabulary's genes have no tokens: drop them, and say so."""
    empty = cells.n_genes_expressed == 0
    if empty.all():
        raise ExceiverInputError(
            f"{name}: none of its {cells.n_cells:,} cells has counts in the vocabulary's genes"
        )
    if empty.any():
        log.warning(
            "%s: dropped %s of %s cells with no counts in the vocabulary's genes",
            name, f"{int(empty.sum()):,}", f"{cells.n_cells:,}",
        )
        return cells.subset(np.flatnonzero(~empty))
    return cells


def require_nonempty_cells(cells: CellCounts, name: str = "dataset") -> None:
    """For outputs aligned with the user's cells, an empty cell is an error, not a silent drop."""
    empty = np.flatnonzero(cells.n_genes_expressed == 0)
    if len(empty):
        raise ExceiverInputError(
            f"{name}: {len(empty):,} of {cells.n_cells:,} cells have no counts in the model's "
            f"vocabulary genes (e.g. {list(cells.obs_names[empty[:3]])}) and cannot be embedded; "
            "remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1) after subsetting "
            "to the model's genes"
        )


def log_normalise(counts: np.ndarray, library_size: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p of counts scaled to `target_sum` per cell; `library_size` is given per entry."""
    return np.log1p(counts * (target_sum / library_size))


def within_cell_ranks(values: np.ndarray, entry_cell: np.ndarray, n_cells: int) -> np.ndarray:
    """Each entry's rank among its cell's entries, as a quantile scaled to (0, 2): mean 1, like
    the shifted z-scores. A cell's ranks do not depend on its depth, only on its genes' order."""
    order = np.lexsort((values, entry_cell))
    sizes = np.bincount(entry_cell, minlength=n_cells)
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(values))
    rank[order] = np.arange(len(values)) - starts[entry_cell[order]]
    return (2 * (rank + 0.5) / np.maximum(sizes[entry_cell], 1)).astype(np.float32)


def entry_library_size(cells: CellCounts) -> np.ndarray:
    """Each non-zero entry's cell library size, aligned with `cells.counts.data`."""
    return np.repeat(cells.library_size, cells.n_genes_expressed)


@dataclass
class GeneScaler:
    """Per-gene statistics of log-normalised expression, fitted on training cells."""

    mean: np.ndarray  # float32 per vocabulary gene, over measuring cells, zeros included
    std: np.ndarray  # float32; 1 for constant or never-measured genes
    n_cells: np.ndarray  # int64: training cells that measured the gene
    expressed_mean: np.ndarray  # float32: mean value over training cells that express the gene
    n_expressed: np.ndarray  # int64: training cells that express the gene
    target_sum: float = TARGET_SUM
    max_value: float = MAX_VALUE

    def __len__(self) -> int:
        return len(self.mean)

    def values(self, gene_ids: np.ndarray, log_expression: np.ndarray) -> np.ndarray:
        """The model's token value: clip((x - mean) / std, max 10) + 1."""
        z = (log_expression - self.mean[gene_ids]) / self.std[gene_ids]
        return (np.minimum(z, self.max_value) + SHIFT).astype(np.float32)

    def zero_values(self, gene_ids: np.ndarray) -> np.ndarray:
        """The value of a measured zero count (the target of zero-gene queries)."""
        return self.values(gene_ids, np.zeros(len(gene_ids), dtype=np.float32))

    def log_expression(self, gene_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Back from model values to log-normalised expression: (value - 1) x std + mean (the
        inverse of `values` below the clip; predictions are not clipped, so neither is this)."""
        return ((values - SHIFT) * self.std[gene_ids] + self.mean[gene_ids]).astype(np.float32)

    def cell_values(self, cells: CellCounts, ranks: bool = False) -> np.ndarray:
        """Values of all non-zero entries of `cells`, aligned with `cells.counts.data`; with
        `ranks`, each value's within-cell rank (`within_cell_ranks`) instead."""
        counts = cells.counts
        x = log_normalise(counts.data, entry_library_size(cells), self.target_sum)
        values = self.values(counts.indices, x)
        if ranks:
            values = within_cell_ranks(values, np.repeat(np.arange(cells.n_cells), cells.n_genes_expressed),
                                       cells.n_cells)
        return values

    @classmethod
    def fit(
        cls,
        cells: CellCounts,
        *,
        target_sum: float = TARGET_SUM,
        max_value: float = MAX_VALUE,
        chunk_size: int = 8192,
        ranks: bool = False,
    ) -> GeneScaler:
        """Streaming fit over sparse chunks of cells; a cell counts towards a gene's statistics
        only if its dataset measured that gene (unmeasured is not zero). `ranks`: the model's
        values are within-cell ranks, so the gene-mean baseline averages those."""
        return cls.fit_chunks(lambda: _chunks(cells, chunk_size), cells.counts.shape[1],
                              target_sum=target_sum, max_value=max_value, ranks=ranks)

    @classmethod
    def fit_chunks(
        cls,
        chunks: Callable[[], Iterable[CellCounts]],
        n_genes: int,
        *,
        target_sum: float = TARGET_SUM,
        max_value: float = MAX_VALUE,
        ranks: bool = False,
    ) -> GeneScaler:
        """`fit` over cells that arrive in chunks (e.g. read from disk): `chunks()` is called
        twice, once per pass, and must give the same cells both times."""
        n_cells = np.zeros(n_genes, dtype=np.int64)
        s1 = np.zeros(n_genes)
        s2 = np.zeros(n_genes)
        for chunk in chunks():
            n_cells += chunk.measured.T.astype(np.int64) @ np.bincount(chunk.source, minlength=len(chunk.measured))
            x = log_normalise(chunk.counts.data.astype(np.float64), entry_library_size(chunk), target_sum)
            s1 += np.bincount(chunk.counts.indices, weights=x, minlength=n_genes)
            s2 += np.bincount(chunk.counts.indices, weights=x * x, minlength=n_genes)
        denom = np.maximum(n_cells, 1)
        mean = s1 / denom
        std = np.sqrt(np.maximum(s2 / denom - mean**2, 0.0))
        std[(std < 1e-6) | (n_cells == 0)] = 1.0  # constant genes keep their centred value
        scaler = cls(
            mean.astype(np.float32), std.astype(np.float32), n_cells,
            np.zeros(n_genes, dtype=np.float32), np.zeros(n_genes, dtype=np.int64), target_sum, max_value,
        )
        scaler._fit_expressed_means(chunks(), ranks)
        return scaler

    def _fit_expressed_means(self, chunks: Iterable[CellCounts], ranks: bool = False) -> None:
        """The gene-mean baseline: each gene's mean value over the training cells expressing it
        (genes never expressed in training fall back to the mean over all expressed entries)."""
        n_genes = len(self)
        total = np.zeros(n_genes)
        count = np.zeros(n_genes, dtype=np.int64)
        for chunk in chunks:
            values = self.cell_values(chunk, ranks)
            total += np.bincount(chunk.counts.indices, weights=values, minlength=n_genes)
            count += np.bincount(chunk.counts.indices, minlength=n_genes)
        fallback = total.sum() / max(count.sum(), 1)
        self.expressed_mean = np.where(count > 0, total / np.maximum(count, 1), fallback).astype(np.float32)
        self.n_expressed = count

    @property
    def trained_genes(self) -> np.ndarray:
        """Genes expressed in training (the others have untrained embeddings); every gene for an
        imported scaler, whose training counts are unknown."""
        return self.n_expressed > 0 if self.n_expressed.any() else np.ones(len(self), dtype=bool)

    @property
    def mean_expressed_value(self) -> float:
        """The average value of an expressed entry in the training cells."""
        return float((self.expressed_mean * self.n_expressed).sum() / max(self.n_expressed.sum(), 1))


def _chunks(cells: CellCounts, chunk_size: int):
    for start in range(0, cells.n_cells, chunk_size):
        yield cells.subset(np.arange(start, min(start + chunk_size, cells.n_cells)))
