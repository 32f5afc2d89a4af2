"""Cells made ready for a model, and the paper's value transform: normalise to 1e4 per cell, log1p,
z-score per gene (statistics fitted once, on training cells, zeros included), clip at 10, plus 1.
(Counts were checked where they were read: `exceiver.data.counts.check_counts`.)

Everything here works on the non-zero entries of sparse counts: a dense cells x genes matrix is
never built.
"""

from __future__ import annotations

import functools
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
DISPERSION_BINS = 20  # of genes by mean expression, for their normalised dispersion (Seurat's binning)


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
    # float32: median normalised expression (counts per target_sum) over the training cells that
    # express the gene, the denominator of rank token selection; None in scalers saved before it
    # existed and in imported ones.
    expressed_median: np.ndarray | None = None

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

    def median_expression(self, gene_ids: np.ndarray) -> np.ndarray:
        """Each gene's median normalised expression over the training cells expressing it (what
        rank token selection divides by), refused when the scaler predates the statistic."""
        if self.expressed_median is None:
            raise ExceiverInputError(
                "token_selection='rank' needs each gene's median expression over the training cells, which this "
                "model's scaler lacks (saved before it existed, or imported): pretrain again, or keep "
                "token_selection='random'")
        return self.expressed_median[gene_ids]

    def variability(self, gene_ids: np.ndarray) -> np.ndarray:
        """Token-sampling weights of genes: exp of their normalised dispersion (below), clipped at
        +-3 so that every gene keeps a chance; genes never expressed in training weigh 1."""
        return self._dispersion_weights[gene_ids]

    @functools.cached_property
    def _dispersion_weights(self) -> np.ndarray:
        """A normalised dispersion from the fitted statistics (Seurat's binning, on the log scale:
        log(variance / mean) of log expression rather than of expm1 values), z-scored among the training genes of similar mean (DISPERSION_BINS bins of equal
        size), so that steady, highly expressed genes (ribosomal, housekeeping) do not outweigh the
        genes that tell cells apart merely for their level."""
        trained = self.trained_genes & (self.mean > 0)
        log_dispersion = np.log(np.square(self.std, dtype=np.float64) / np.where(trained, self.mean, 1.0))
        edges = np.quantile(self.mean[trained], np.linspace(0, 1, DISPERSION_BINS + 1)[1:-1]) if trained.any() else []
        bins = np.searchsorted(edges, self.mean)[trained]
        size = np.maximum(np.bincount(bins, minlength=DISPERSION_BINS), 1)
        centre = np.bincount(bins, weights=log_dispersion[trained], minlength=DISPERSION_BINS) / size
        spread = np.sqrt(np.bincount(bins, weights=(log_dispersion[trained] - centre[bins]) ** 2,
                                     minlength=DISPERSION_BINS) / size)
        z = np.zeros(len(self))
        z[trained] = (log_dispersion[trained] - centre[bins]) / np.where(spread[bins] > 0, spread[bins], np.inf)
        return np.exp(np.clip(z, -3.0, 3.0))

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
        medians = _ExpressedMedians(n_genes, target_sum)
        for chunk in chunks():
            n_cells += chunk.measured.T.astype(np.int64) @ np.bincount(chunk.source, minlength=len(chunk.measured))
            x = log_normalise(chunk.counts.data.astype(np.float64), entry_library_size(chunk), target_sum)
            s1 += np.bincount(chunk.counts.indices, weights=x, minlength=n_genes)
            s2 += np.bincount(chunk.counts.indices, weights=x * x, minlength=n_genes)
            medians.add_coarse(chunk)
        denom = np.maximum(n_cells, 1)
        mean = s1 / denom
        std = np.sqrt(np.maximum(s2 / denom - mean**2, 0.0))
        std[(std < 1e-6) | (n_cells == 0)] = 1.0  # constant genes keep their centred value
        scaler = cls(
            mean.astype(np.float32), std.astype(np.float32), n_cells,
            np.zeros(n_genes, dtype=np.float32), np.zeros(n_genes, dtype=np.int64), target_sum, max_value,
            standardise,
        )
        medians.locate()
        scaler._fit_expressed_statistics(chunks(), medians)
        return scaler

    def _fit_expressed_statistics(self, chunks: Iterable[CellCounts], medians: _ExpressedMedians) -> None:
        """The gene-mean baseline: each gene's mean value over the training cells expressing it
        (genes never expressed in training fall back to the mean over all expressed entries), and
        the second pass of the genes' median expression."""
        n_genes = len(self)
        total = np.zeros(n_genes)
        count = np.zeros(n_genes, dtype=np.int64)
        for chunk in chunks:
            values = self.cell_values(chunk)
            total += np.bincount(chunk.counts.indices, weights=values, minlength=n_genes)
            count += np.bincount(chunk.counts.indices, minlength=n_genes)
            medians.add_fine(chunk)
        fallback = total.sum() / max(count.sum(), 1)
        self.expressed_mean = np.where(count > 0, total / np.maximum(count, 1), fallback).astype(np.float32)
        self.n_expressed = count
        self.expressed_median = medians.medians()

    @property
    def trained_genes(self) -> np.ndarray:
        """Genes expressed in training (the others have untrained embeddings); every gene for an
        imported scaler, whose training counts are unknown."""
        return self.n_expressed > 0 if self.n_expressed.any() else np.ones(len(self), dtype=bool)

    @property
    def mean_expressed_value(self) -> float:
        """The average value of an expressed entry in the training cells."""
        return float((self.expressed_mean * self.n_expressed).sum() / max(self.n_expressed.sum(), 1))


# Medians are placed on a grid of log(count / library) over [LOG_FRACTION_FLOOR, 0] (a count is at
# most its cell's library; a fraction below e**-21 = 7.6e-10, a count of 1 in 1.3 billion, counts as
# the lowest bin): MEDIAN_BINS coarse bins per gene in the scaler's first pass find the bin holding
# the median, MEDIAN_BINS fine bins of that bin in its second pass place it, within 21 / 64**2 =
# 0.0051 in log, 0.5% of the expression at any depth.
MEDIAN_BINS = 64
LOG_FRACTION_FLOOR = -21.0


class _ExpressedMedians:
    """Each gene's (lower) median normalised expression over the cells expressing it, streamed in
    two passes over the same cells with 2 x MEDIAN_BINS counts per gene (an exact median would keep
    every value; the geometric mean, exact in one pass, is pulled by the tails of skewed genes).
    The lower median: for an even number of cells the smaller of the two middle values, not their
    mean (which, for genes expressed in a few cells, can differ from it by a lot)."""

    def __init__(self, n_genes: int, target_sum: float):
        self.target_sum = target_sum
        self.width = -LOG_FRACTION_FLOOR / MEDIAN_BINS  # of a coarse bin
        self.coarse = np.zeros((n_genes, MEDIAN_BINS), dtype=np.int64)
        self.fine = np.zeros((n_genes, MEDIAN_BINS), dtype=np.int64)
        self.bin, self.below = np.zeros(n_genes, dtype=np.int64), np.zeros(n_genes, dtype=np.int64)

    def _coarse_bin(self, position: np.ndarray) -> np.ndarray:
        return np.clip((position / self.width).astype(np.int64), 0, MEDIAN_BINS - 1)

    def add_coarse(self, cells: CellCounts) -> None:
        """First pass: count each gene's expressed entries in coarse bins."""
        self.coarse += _histograms(cells.counts.indices, self._coarse_bin(_grid_position(cells)), self.coarse.shape)

    def locate(self) -> None:
        """Between the passes: each gene's coarse bin holding its median, and its values below it."""
        cumulative = np.cumsum(self.coarse, axis=1)
        self.bin, self.below = _median_bin(cumulative, cumulative[:, -1] / 2)

    def add_fine(self, cells: CellCounts) -> None:
        """Second pass (the same cells): count the entries in their gene's median bin in fine bins."""
        genes, position = cells.counts.indices, _grid_position(cells)
        inside = self._coarse_bin(position) == self.bin[genes]
        genes, position = genes[inside], position[inside]
        fine = ((position - self.bin[genes] * self.width) * (MEDIAN_BINS / self.width)).astype(np.int64)
        self.fine += _histograms(genes, np.clip(fine, 0, MEDIAN_BINS - 1), self.fine.shape)

    def medians(self) -> np.ndarray:
        """float32 medians, in counts per target_sum, interpolated within their fine bin; genes never
        expressed get the median gene's."""
        n = self.coarse.sum(axis=1)
        wanted = n / 2 - self.below
        fine_bin, before = _median_bin(np.cumsum(self.fine, axis=1), wanted)
        in_bin = np.maximum(np.take_along_axis(self.fine, fine_bin[:, None], axis=1)[:, 0], 1)
        position = (self.bin + (fine_bin + (wanted - before) / in_bin) / MEDIAN_BINS) * self.width
        median = self.target_sum * np.exp(position + LOG_FRACTION_FLOOR)
        expressed = n > 0
        fallback = np.median(median[expressed]) if expressed.any() else 1.0
        return np.where(expressed, median, fallback).astype(np.float32)


def _grid_position(cells: CellCounts) -> np.ndarray:
    """Each expressed entry's log(count / library) above LOG_FRACTION_FLOOR."""
    return np.log(cells.counts.data / entry_library_size(cells)) - LOG_FRACTION_FLOOR


def _histograms(genes: np.ndarray, bins: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.bincount(genes.astype(np.int64) * shape[1] + bins, minlength=shape[0] * shape[1]).reshape(shape)


def _median_bin(cumulative: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the first bin whose cumulative count reaches `half`, and the count before it."""
    bin_ = np.minimum((cumulative < half[:, None]).sum(axis=1), cumulative.shape[1] - 1)
    before = np.where(bin_ > 0, np.take_along_axis(cumulative, np.maximum(bin_ - 1, 0)[:, None], axis=1)[:, 0], 0)
    return bin_, before


def _chunks(cells: CellCounts, chunk_size: int):
    for start in range(0, cells.n_cells, chunk_size):
        yield cells.subset(np.arange(start, min(start + chunk_size, cells.n_cells)))
