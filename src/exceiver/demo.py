"""`exceiver demo`: pretrain, embed and report on 700 PBMCs that ship with scanpy (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from matplotlib.figure import Figure
from sklearn.model_selection import train_test_split

from exceiver.evaluate.baselines import pca_embedding
from exceiver.evaluate.cells import knn_scores
from exceiver.outputs import atomic_dir, foreign_files
from exceiver.pretrain import pretrain

LABEL = "cell_type"


def pbmc68k_counts() -> ad.AnnData:
    """scanpy's `pbmc68k_reduced` (700 PBMCs, 10 cell types) with integer counts recovered from
    its log-normalised `.raw` (765 genes): within a cell, expm1(x) is proportional to the count,
    and the smallest non-zero value is a count of 1."""
    source = sc.datasets.pbmc68k_reduced()
    x = sp.csr_matrix(source.raw.X, dtype=np.float64)
    scaled = np.expm1(x.data)
    smallest = np.minimum.reduceat(scaled, x.indptr[:-1])
    ratio = scaled / np.repeat(smallest, np.diff(x.indptr))
    counts = np.rint(ratio)
    deviation = np.abs(ratio - counts).max()
    if deviation > 0.25:
        raise RuntimeError(f"pbmc68k_reduced: counts not recoverable (max deviation {deviation:.2f})")
    adata = ad.AnnData(
        sp.csr_matrix((counts.astype(np.float32), x.indices, x.indptr), shape=x.shape),
        obs=pd.DataFrame({LABEL: source.obs["bulk_labels"].astype("category")}, index=source.obs_names),
        var=pd.DataFrame(index=source.raw.var_names),
    )
    adata.uns["provenance"] = (
        "scanpy.datasets.pbmc68k_reduced(): counts = round(expm1(raw.X) / min non-zero per cell); "
        f"max deviation from an integer {deviation:.3f}"
    )
    return adata


def run_demo(out: str | Path = "exceiver_demo", *, max_minutes: float = 3.0, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> str:
    """Pretrain on 80% of the cells, embed all, and compare cell-type kNN accuracy on the held-out
    20% with PCA of the same cells. Writes the model, the embedded .h5ad, a UMAP and a report.
    An earlier demo's output folder is replaced; another output of exceiver only with
    `overwrite`; a folder holding anything else never."""
    out = Path(out)
    earlier_demo = out.is_dir() and (out / "demo_metrics.json").is_file() and not foreign_files(out)
    with atomic_dir(out, overwrite=overwrite or earlier_demo) as folder:
        adata = pbmc68k_counts()
        train, test = train_test_split(np.arange(adata.n_obs), test_size=0.2, random_state=seed,
                                       stratify=adata.obs[LABEL])
        model = pretrain(adata[np.sort(train)].copy(), folder / "model", max_minutes=max_minutes,
                         seed=seed, progress=progress)
        model.embed(adata, progress=progress)
        adata.obsm["X_pca"] = pca_embedding(adata, fit_cells=train, n_hvg=None, seed=seed)
        labels = adata.obs[LABEL].to_numpy()
        scores = {key: knn_scores(adata.obsm[key], labels, train, test) for key in ("X_exceiver", "X_pca")}
        _plot_umaps(adata, folder / "umap.png")
        adata.write_h5ad(folder / "pbmc68k_exceiver.h5ad")
        metrics = {"model": model.metrics, "knn_k15_held_out": scores,
                   "n_train_cells": len(train), "n_test_cells": len(test)}
        (folder / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report = _report(model, scores, len(train), len(test), Path(out))
        (folder / "report.md").write_text(report)
    return report


def _plot_umaps(adata: ad.AnnData, path: Path) -> None:
    fig = Figure(figsize=(13, 5.5))
    axes = fig.subplots(1, 2)
    for ax, (key, title) in zip(axes, [("X_exceiver", "Exceiver (cell bottleneck)"), ("X_pca", "PCA of log-normalised genes")]):
        sc.pp.neighbors(adata, use_rep=key, key_added=key)
        adata.obsm[f"X_umap_{key}"] = sc.tl.umap(adata, neighbors_key=key, copy=True).obsm["X_umap"]
        sc.pl.embedding(adata, basis=f"X_umap_{key}", color=LABEL, ax=ax, show=False, title=title,
                        legend_loc="right margin" if key == "X_pca" else None, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _report(model, scores: dict, n_train: int, n_test: int, out: Path) -> str:
    m = model.metrics
    return f"""# exceiver demo: 700 PBMCs (scanpy `pbmc68k_reduced`, counts recovered from `.raw`)

Model: {model}
Pretrained for {m['seconds']:.0f} s ({m['epochs']} epochs, {m['steps']} steps, stopped by {m['stopped_by']})
on {n_train} cells ({m['n_train_cells']} for training, {m['n_val_cells']} for validation).

## Masked-expression prediction (validation cells, best epoch)
| predictor | MSE | Pearson r |
|---|---|---|
| Exceiver | {m['val_masked_mse']:.4f} | {m['val_pearson']:.3f} |
| gene-mean baseline | {m['val_gene_mean_mse']:.4f} | |

MSE ratio (model / baseline): {m['val_mse_ratio']:.3f}

## Cell types from embeddings: kNN (k=15) on {n_test} held-out cells
| embedding | accuracy | macro-F1 |
|---|---|---|
| Exceiver `X_exceiver` | {scores['X_exceiver']['accuracy']:.3f} | {scores['X_exceiver']['macro_f1']:.3f} |
| PCA of log-normalised genes | {scores['X_pca']['accuracy']:.3f} | {scores['X_pca']['macro_f1']:.3f} |

## Files in {out}
- `model/`: the model folder (open with `exceiver.Exceiver.load`)
- `pbmc68k_exceiver.h5ad`: the cells with `obsm['X_exceiver']` and `obsm['X_pca']`
- `umap.png`: UMAPs of both embeddings coloured by cell type
"""
