"""Cells made ready for a model, and the paper's value transform: normalise to 1e4 per cell, log1p,
z-score per gene (statistics fitted once, on training cells, zeros included), clip at 10, plus 1.
(Counts were checked where they were read: `exceiver.data.counts.check_counts`.)

Everything here works on the non-zero entries of sparse counts: a dense cells x genes matrix is
never built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from exceiver.data.cells import CellCounts
from exceiver.errors import ExceiverInputError, plain

log = logging.getLogger(__name__)

TARGET_SUM = 1e4
MAX_VALUE = 10.0
SHIFT = 1.0  # the paper shifts z-scores so that an average expression level is 1, not 0


EMPTY_CELLS = ("drop", "refuse")


def prepare_cells(cells: CellCounts, name: str = "dataset", *, genes: np.ndarray | None = None,
                  empty: str = "drop", genes_words: str = "the genes the model was trained on") -> CellCounts:
    """The one way cells enter a model: only `genes` kept (a bool mask over the vocabulary, e.g.
    the genes a model saw expressed in training; the others become unmeasured), and cells left
    without counts either dropped (training: they have no tokens) or refused (outputs aligned with
    the user's cells, where a silent drop would misalign them); `genes_words` names those genes
    in the refusal."""
    if empty not in EMPTY_CELLS:
        raise ValueError(f"empty must be one of {EMPTY_CELLS}, got {empty!r}")
    if genes is not None:
        cells = cells.keep_genes(genes)
    is_empty = cells.n_genes_expressed == 0
    if not is_empty.any():
        return cells
    if empty == "refuse":
        rows = np.flatnonzero(is_empty)
        raise ExceiverInputError(
            f"{name}: {len(rows):,} of {cells.n_cells:,} cells have no counts in {genes_words} (e.g. "
            f"{plain(cells.obs_names[rows[:3]])}), so the model has nothing to read in them; remove those cells first"
        )
    return cells.subset(np.flatnonzero(~is_empty))


class PrepareCells:
    """`prepare_cells` as a picklable callable (loader workers prepare the chunks they read)."""

    def __init__(self, genes: np.ndarray | None, name: str, empty: str = "refuse"):
        self.genes, self.name, self.empty = genes, name, empty

    def __call__(self, cells: CellCounts) -> CellCounts:
        return prepare_cells(cells, self.name, genes=self.genes, empty=self.empty)


def report_dropped(name: str, before: int, after: int) -> None:
    """Say how many of a dataset's cells `prepare_cells` dropped; refuse a dataset left empty."""
    if after == 0:
        raise ExceiverInputError(f"{name}: none of its {before:,} cells has counts in the vocabulary's genes")
    if after < before:
        log.warning("%s: dropped %s of %s cells with no counts in the vocabulary's genes", name,
                    f"{before - after:,}", f"{before:,}")


def log_normalise(counts: np.ndarray, library_size: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p of counts scaled to `target_sum` per cell; `library_size` is given per entry."""
    return np.log1p(counts * (target_sum / library_size))


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
    standardise: bool = True  # False: values are the log-normalised expression itself

    def __len__(self) -> int:
        return len(self.mean)

    def values(self, gene_ids: np.ndarray, log_expression: np.ndarray) -> np.ndarray:
        """The model's token value: clip((x - mean) / std, max 10) + 1, or x unstandardised."""
        if not self.standardise:
            return np.asarray(log_expression, dtype=np.float32)
        z = (log_expression - self.mean[gene_ids]) / self.std[gene_ids]
        return (np.minimum(z, self.max_value) + SHIFT).astype(np.float32)

    def zero_values(self, gene_ids: np.ndarray) -> np.ndarray:
        """The value of a measured zero count (the target of zero-gene queries)."""
        return self.values(gene_ids, np.zeros(len(gene_ids), dtype=np.float32))

    def log_expression(self, gene_ids: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Back from model values to log-normalised expression: (value - 1) x std + mean (the
        inverse of `values` below the clip; predictions are not clipped, so neither is this)."""
        if not self.standardise:
            return np.asarray(values, dtype=np.float32)
        return ((values - SHIFT) * self.std[gene_ids] + self.mean[gene_ids]).astype(np.float32)

    def value_scale(self, gene_ids: np.ndarray) -> np.ndarray:
        """Log-normalised expression per unit of model value, per gene: a shift in model values
        times this is a shift in log-normalised expression."""
        return self.std[gene_ids] if self.standardise else np.ones(len(gene_ids), dtype=np.float32)

    def cell_values(self, cells: CellCounts) -> np.ndarray:
        """Values of all non-zero entries of `cells`, aligned with `cells.counts.data`."""
        counts = cells.counts
        return self.values(counts.indices, log_normalise(counts.data, entry_library_size(cells), self.target_sum))

    @classmethod
    def fit(
        cls,
        cells: CellCounts,
        *,
        target_sum: float = TARGET_SUM,
        max_value: float = MAX_VALUE,
        standardise: bool = True,
        chunk_size: int = 8192,
    ) -> GeneScaler:
        """Streaming fit over sparse chunks of cells; a cell counts towards a gene's statistics
        only if its dataset measured that gene (unmeasured is not zero)."""
        return cls.fit_chunks(lambda: _chunks(cells, chunk_size), cells.counts.shape[1],
                              target_sum=target_sum, max_value=max_value, standardise=standardise)

    @classmethod
    def fit_chunks(
        cls,
        chunks: Callable[[], Iterable[CellCounts]],
        n_genes: int,
        *,
        target_sum: float = TARGET_SUM,
        max_value: float = MAX_VALUE,
        standardise: bool = True,
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
            standardise,
        )
        scaler._fit_expressed_means(chunks())
        return scaler

    def _fit_expressed_means(self, chunks: Iterable[CellCounts]) -> None:
        """The gene-mean baseline: each gene's mean value over the training cells expressing it
        (genes never expressed in training fall back to the mean over all expressed entries)."""
        n_genes = len(self)
        total = np.zeros(n_genes)
        count = np.zeros(n_genes, dtype=np.int64)
        for chunk in chunks:
            values = self.cell_values(chunk)
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
