"""Baseline cell representations computed from the same counts the model sees."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA

from exceiver.preprocess import TARGET_SUM


def log_normalised(adata: ad.AnnData, layer: str | None = None) -> ad.AnnData:
    """A copy with X = log1p(counts normalised to 1e4 per cell over all of its genes): the
    standard scanpy recipe that baselines are computed from."""
    counts = adata.layers[layer] if layer else adata.X
    out = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), obs=adata.obs[[]], var=adata.var[[]])
    sc.pp.normalize_total(out, target_sum=TARGET_SUM)
    sc.pp.log1p(out)
    return out


def pca_embedding(adata: ad.AnnData, *, fit_cells: np.ndarray | None = None, n_hvg: int | None = 2000,
                  n_comps: int = 50, layer: str | None = None, seed: int = 0) -> np.ndarray:
    """PCA of log-normalised highly variable genes (all genes with `n_hvg=None`); genes and
    components are chosen on `fit_cells` only, then every cell is projected."""
    logn = log_normalised(adata, layer)
    fit = np.arange(adata.n_obs) if fit_cells is None else np.asarray(fit_cells)
    if n_hvg is not None and n_hvg < adata.n_vars:
        hvg = sc.pp.highly_variable_genes(logn[fit], n_top_genes=n_hvg, inplace=False)
        logn = logn[:, np.asarray(hvg["highly_variable"])]
    x = logn.X.toarray()
    n_comps = min(n_comps, len(fit) - 1, x.shape[1])
    pca = PCA(n_components=n_comps, random_state=seed).fit(x[fit])
    return pca.transform(x).astype(np.float32)
