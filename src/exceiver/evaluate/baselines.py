"""Baseline cell representations computed from the same counts the model sees."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.decomposition import PCA

from exceiver.data.counts import counts_matrix, counts_var
from exceiver.data.preprocess import TARGET_SUM


def log_normalised(adata: ad.AnnData, layer: str | None = None) -> ad.AnnData:
    """A copy with X = log1p(counts normalised to 1e4 per cell over all of its genes): the
    standard scanpy recipe that baselines are computed from (counts from X, a layer or adata.raw)."""
    out = ad.AnnData(counts_matrix(adata, layer).astype(np.float32), obs=adata.obs[[]],
                     var=counts_var(adata, layer).var[[]])
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


# The PCA recipes a cell embedding is compared with: (highly variable genes or None for all, components).
PCA_RECIPES = {"pca20_hvg2000": (2000, 20), "pca50_hvg2000": (2000, 50), "pca20_all": (None, 20), "pca50_all": (None, 50)}


def cell_baselines(adata: ad.AnnData, *, layer: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The standard representations of the same cells: each PCA recipe of log-normalised counts
    (scanpy's PCA, sparse input kept sparse) and the log-normalised 2,000 HVGs themselves."""
    logn = log_normalised(adata, layer)
    logn = logn[:, np.asarray(logn.X.getnnz(axis=0)) > 0].copy()
    hvg = np.ones(logn.n_vars, dtype=bool)
    if logn.n_vars > 2000:
        hvg = sc.pp.highly_variable_genes(logn, n_top_genes=2000, inplace=False)["highly_variable"].to_numpy()
    reps = {}
    for name, (n_hvg, n_comps) in PCA_RECIPES.items():
        mask = hvg if n_hvg else None
        n_genes = int(mask.sum()) if mask is not None else logn.n_vars
        n = min(n_comps, logn.n_obs - 1, n_genes - 1)
        reps[name] = sc.pp.pca(logn, n_comps=n, mask_var=mask, random_state=seed, copy=True).obsm["X_pca"]
    reps["hvg2000"] = logn.X[:, hvg].toarray()
    return {name: np.asarray(r, dtype=np.float32) for name, r in reps.items()}


def gene_loadings(adata: ad.AnnData, genes: np.ndarray, *, layer: str | None = None, n_comps: int = 50,
                  seed: int = 0) -> pd.DataFrame:
    """Each expressed gene's row of PCA loadings of the log-normalised cells (scaled by the
    components' standard deviations): the gene representation that a model must beat. Rows are
    indexed by `genes` (one name per gene of the counts, e.g. the model gene each reads as; "" for
    none); duplicated names keep the first."""
    logn = log_normalised(adata, layer)
    expressed = np.asarray(logn.X.getnnz(axis=0)) > 0
    logn = logn[:, expressed].copy()
    n = min(n_comps, logn.n_obs - 1, logn.n_vars - 1)
    sc.pp.pca(logn, n_comps=n, random_state=seed)
    loadings = logn.varm["PCs"] * np.sqrt(logn.uns["pca"]["variance"])[None, :]
    table = pd.DataFrame(loadings, index=pd.Index(np.asarray(genes)[expressed], name="gene"))
    return table[~table.index.duplicated() & (table.index != "")]
