"""The vocabulary of a pretraining run: the most variable genes of its training cells.

Cells differ by a few thousand variable genes; the rest add tokens (cost) and noise, not identity.
Selection uses scanpy's `seurat_v3` rule on raw counts (the recipe scVI's users follow), per
batch: the run's batches where it has a batch key (as scVI's users choose genes for an integration),
else each dataset, when there are several, so that one deep batch or dataset cannot choose for all.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch

from exceiver.data.cells import CellCounts
from exceiver.errors import ExceiverInputError, option

log = logging.getLogger(__name__)

MIN_BATCH_CELLS = 50  # batches with fewer training cells are ranked together


def highly_variable_genes(cells: CellCounts, n_top_genes: int, batches: np.ndarray | None = None) -> np.ndarray:
    """Sorted vocabulary ids of the `n_top_genes` most variable genes of `cells` (all genes with
    counts, if they are fewer), ranked within each of `batches` (a label per cell; batches of
    fewer than `MIN_BATCH_CELLS` cells ranked together; default, or a single batch: each cell's
    dataset) and merged as seurat_v3 merges batches."""
    if n_top_genes < 1:
        raise ExceiverInputError(f"{option('n_top_genes')} must be >= 1, got {n_top_genes}")
    expressed = np.flatnonzero(np.bincount(cells.counts.indices, minlength=cells.counts.shape[1]))
    if len(expressed) <= n_top_genes:
        return expressed
    try:
        import skmisc  # noqa: F401  (seurat_v3's loess fit)
    except ImportError as err:  # a declared dependency: only a broken install lacks it
        raise ExceiverInputError("selecting variable genes needs scikit-misc: pip install scikit-misc") from err
    adata = ad.AnnData(cells.counts[:, expressed].astype(np.float32))
    batches = cells.source if batches is None or len(np.unique(batches)) < 2 else _pooled_small(np.asarray(batches))
    several = len(np.unique(batches)) > 1
    if several:
        adata.obs["batch"] = pd.Categorical(batches)
    threads = torch.get_num_threads()
    try:
        table = _seurat_v3(adata, n_top_genes, "batch" if several else None)
    finally:  # its numerical libraries reset the OpenMP team size that torch shares (measured: 1 -> 2)
        torch.set_num_threads(threads)
    chosen = np.sort(expressed[np.flatnonzero(table["highly_variable"].to_numpy())])
    log.info("vocabulary: the %s most variable of %s expressed genes", f"{len(chosen):,}", f"{len(expressed):,}")
    return chosen


def _pooled_small(batches: np.ndarray) -> np.ndarray:
    """Batch labels with the batches of fewer than `MIN_BATCH_CELLS` cells pooled into one group (a
    loess fit of variance on mean needs cells: seurat_v3 per batch fails on a batch of a few)."""
    names, counts = np.unique(batches, return_counts=True)
    small = names[counts < MIN_BATCH_CELLS]
    if len(small):
        log.info("variable genes: %d batches of fewer than %d cells (e.g. %s) are ranked together", len(small),
                 MIN_BATCH_CELLS, small[0])
    return np.where(np.isin(batches, small), "(batches under %d cells)" % MIN_BATCH_CELLS, batches.astype(str))


def _seurat_v3(adata: ad.AnnData, n_top_genes: int, batch_key: str | None) -> pd.DataFrame:
    """scanpy's seurat_v3 table, widening the loess span when few cells make its fit singular
    (seen on 240 PBMCs at scanpy's 0.3; wider spans only smooth the mean-variance trend more)."""
    failure = None
    for span in (0.3, 0.6, 1.0):
        try:
            return sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes, inplace=False,
                                               batch_key=batch_key, span=span)
        except ValueError as err:
            log.info("variable genes: loess span %s failed (%s); widening", span, err)
            failure = err
    raise ExceiverInputError(f"cannot rank variable genes (loess fit failed: {failure}); "
                             f"pass {option('n_top_genes', 0)} to keep all genes") from failure
