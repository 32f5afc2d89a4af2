"""Cells in vocabulary space: a dataset's counts moved onto the model's gene ids.

A vocabulary gene that a dataset does not contain is *unmeasured*, which is not the same as a zero
count: `CellCounts.measured` records, per source dataset, which vocabulary genes were measured, so
that later steps (scaler statistics, zero-gene queries) never mistake "not measured" for "zero".
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from exceiver.data.counts import (
    check_counts,
    count_layers,
    counts_location,
    counts_matrix,
    counts_var,
    location_label,
    refuse_empty,
)
from exceiver.data.genemap import GenePairs
from exceiver.data.vocab import VAR_NAMES, GeneVocab, dataset_genes
from exceiver.errors import ExceiverInputError, option, plain

log = logging.getLogger(__name__)

# Warn (rather than fail) when this little of a dataset, and of the vocabulary, overlaps.
LOW_OVERLAP = 0.2


@dataclass
class CellCounts:
    """Raw counts of cells in vocabulary space (columns are vocabulary ids).

    `source[i]` says which dataset cell i came from, and `measured[source]` which vocabulary genes
    that dataset measured.
    """

    counts: sp.csr_matrix
    measured: np.ndarray  # bool, datasets x vocabulary genes
    source: np.ndarray  # int32, one per cell
    obs_names: np.ndarray
    source_names: list[str]

    @functools.cached_property
    def measured_pool(self) -> tuple[np.ndarray, np.ndarray]:
        """All datasets' measured gene ids, concatenated, and each dataset's offset into them."""
        measured = [np.flatnonzero(m) for m in self.measured]
        return np.concatenate(measured), np.cumsum([0] + [len(m) for m in measured])

    @functools.cached_property
    def measured_keys(self) -> np.ndarray:
        """`measured_pool` as sorted keys dataset x n_genes + gene: finds a gene's slot in its dataset's pool."""
        pool, offsets = self.measured_pool
        return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)) * self.counts.shape[1] + pool

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes_expressed(self) -> np.ndarray:
        return np.diff(self.counts.indptr)

    @property
    def library_size(self) -> np.ndarray:
        """Total counts per cell over the vocabulary genes (the original normalised over these)."""
        return np.asarray(self.counts.sum(axis=1), dtype=np.float64).ravel()

    def keep_genes(self, keep: np.ndarray) -> CellCounts:
        """The same cells with only the genes where `keep` is True (the others become unmeasured)."""
        counts = self.counts.copy()
        counts.data[~keep[counts.indices]] = 0
        counts.eliminate_zeros()
        return CellCounts(counts, self.measured & keep, self.source, self.obs_names, self.source_names)

    def select_genes(self, ids: np.ndarray) -> CellCounts:
        """The same cells in the vocabulary of genes `ids` (column i is old gene ids[i])."""
        return CellCounts(self.counts[:, ids].tocsr(), self.measured[:, ids], self.source, self.obs_names,
                          self.source_names)

    def subset(self, rows: np.ndarray) -> CellCounts:
        rows = np.asarray(rows)
        return CellCounts(
            self.counts[rows], self.measured, self.source[rows], self.obs_names[rows], self.source_names
        )

    @staticmethod
    def concat(parts: Sequence[CellCounts]) -> CellCounts:
        """Stack datasets aligned to the same vocabulary; each keeps its own measured genes."""
        offsets = np.cumsum([0] + [len(p.source_names) for p in parts[:-1]])
        return CellCounts(
            sp.vstack([p.counts for p in parts], format="csr"),
            np.concatenate([p.measured for p in parts]),
            np.concatenate([p.source + o for p, o in zip(parts, offsets)]).astype(np.int32),
            np.concatenate([p.obs_names for p in parts]),
            [n for p in parts for n in p.source_names],
        )


def align(
    adata: ad.AnnData,
    vocab: GeneVocab,
    *,
    gene_key: str | None = None,
    layer: str | None = None,
    name: str = "dataset",
    allow_non_integer: bool = False,
    pairs: GenePairs | None = None,
) -> CellCounts:
    """Map a dataset's counts (X, a layer, or adata.raw with `layer="raw"`) onto the vocabulary,
    after refusing an empty dataset and counts that are not raw counts (`check_counts`).

    Duplicate identifiers (e.g. two Ensembl ids with one symbol) are one gene to the model: their
    counts are summed, with a warning. Genes outside the vocabulary are dropped. With `pairs` the
    dataset's genes are first translated into model genes (counts of genes mapping to one summed).
    """
    genes = counts_var(adata, layer, name)
    refuse_empty(name, adata.n_obs, genes.n_vars)
    matrix = counts_matrix(adata, layer, name)
    location = counts_location(layer, adata.layers.keys(), adata.raw is not None, name)
    elsewhere = [other for other in count_layers(adata) if other != layer]
    check_counts(matrix, name, where=location_label(location), allow_non_integer=allow_non_integer,
                 elsewhere=elsewhere)
    ids, measured = gene_alignment(genes, vocab, gene_key=gene_key, name=name, pairs=pairs)
    return CellCounts(
        to_vocabulary(matrix, ids, len(vocab)), measured, np.zeros(matrix.shape[0], dtype=np.int32),
        np.asarray(adata.obs_names, dtype=object).astype(str), [name],
    )


def gene_alignment(
    adata: ad.AnnData, vocab: GeneVocab, *, gene_key: str | None = None, name: str = "dataset",
    pairs: GenePairs | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary id of each of the dataset's genes (-1: not in the vocabulary) and the
    measured-gene mask [1, vocabulary]; reads only `var`, so a file is aligned once, not per cell
    (with its checks, log line and warnings). With `pairs`, through the model genes they map to."""
    genes = dataset_genes(adata, gene_key)
    if pairs is not None:
        genes = pairs.translate(genes)
    ids = vocab.ids(genes)  # -1 for genes outside the vocabulary (and for empty identifiers)
    matched = ids >= 0
    n_matched = int(matched.sum())
    hint = _gene_key_hint(adata, vocab, gene_key) if pairs is None else " (read through the gene map: is its column " \
        "order model gene, dataset gene?)"
    if n_matched == 0:
        raise ExceiverInputError(
            f"{name}: none of its {len(genes):,} genes is in the model's vocabulary of "
            f"{len(vocab):,} genes (e.g. dataset {plain(genes[:3])} vs vocabulary "
            f"{plain(vocab.genes[:3])}).{hint}"
        )
    unique_matched = np.unique(ids[matched])
    coverage = len(unique_matched) / len(vocab)
    log.info(
        "%s: %s of %s genes are in the vocabulary (%.1f%%), covering %.1f%% of its %s genes",
        name, f"{n_matched:,}", f"{len(genes):,}", 100 * n_matched / len(genes), 100 * coverage,
        f"{len(vocab):,}",
    )
    if n_matched / len(genes) < LOW_OVERLAP and coverage < LOW_OVERLAP:
        log.warning("%s: only %s of %s genes (%.1f%%) are in the model's vocabulary; are the identifiers of the "
                    "right type?%s", name, f"{n_matched:,}", f"{len(genes):,}", 100 * n_matched / len(genes), hint)
    if len(unique_matched) < n_matched:
        dup = pd.Series(genes[matched])
        dup = dup[dup.duplicated()].unique()
        if pairs is not None:  # several of the dataset's genes with one ortholog: expected, said quietly
            log.info("%s: %s model genes are the translation of more than one of its genes (e.g. %s); their counts "
                     "are summed", name, f"{len(dup):,}", plain(dup[:5]))
        else:
            log.warning("%s: %s gene identifiers occur more than once (e.g. %s); their counts are summed into one "
                        "vocabulary gene", name, f"{len(dup):,}", plain(dup[:5]))
    measured = np.zeros((1, len(vocab)), dtype=bool)
    measured[0, unique_matched] = True
    return ids, measured


def to_vocabulary(matrix: sp.csr_matrix, ids: np.ndarray, n_genes: int) -> sp.csr_matrix:
    """Counts of a dataset's genes (columns) moved to vocabulary columns `ids` (from
    `gene_alignment`), as float32 CSR with sorted gene ids; duplicate identifiers are summed."""
    new_cols = ids[matrix.indices]
    keep = new_cols >= 0
    row_of_entry = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_entry[keep], minlength=matrix.shape[0]), out=indptr[1:])
    counts = sp.csr_matrix(
        (matrix.data[keep].astype(np.float32), new_cols[keep].astype(np.int32), indptr),
        shape=(matrix.shape[0], n_genes),
    )
    counts.sum_duplicates()  # sorts gene ids, merges duplicate identifiers, keeps explicit zeros
    counts.eliminate_zeros()
    return counts


def _gene_key_hint(adata: ad.AnnData, vocab: GeneVocab, gene_key: str | None) -> str:
    """Name the var column (or var_names) whose identifiers match the vocabulary best."""
    candidates = {None: adata.var_names} | {
        col: adata.var[col]
        for col in adata.var.columns
        if adata.var[col].dtype == object or isinstance(adata.var[col].dtype, pd.CategoricalDtype)
    }
    best, best_hits = None, 0
    for col, values in candidates.items():
        if col == gene_key:
            continue
        hits = int((vocab.ids(pd.Index(values, dtype=object).astype(str)) >= 0).sum())
        if hits > best_hits:
            best, best_hits = col, hits
    if best_hits == 0:
        return ""
    where = "var_names" if best is None else f"var[{plain(best)!r}]"
    return f" {where} matches {best_hits:,} vocabulary genes: pass {option('gene_key', best or VAR_NAMES)}."
