"""`exceiver demo`: the shipped pretrained model on 700 PBMCs that ship with scanpy (no downloads):
zero-shot, continued on the demo's cells, beside a model trained from scratch for the same minutes
and PCA; then label transfer from labelled cells to held-out ones."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from exceiver.evaluate.baselines import pca_embedding
from exceiver.evaluate.cells import knn_scores
from exceiver.model import Exceiver
from exceiver.outputs import atomic_dir, foreign_files
from exceiver.pretrain import pretrain
from exceiver.shipped import DEFAULT_MODEL

LABEL = "cell_type"
SHIPPED = DEFAULT_MODEL  # the best that ships
# The embeddings compared: obsm key, title (in the figure and report).
EMBEDDINGS = {
    "X_shipped": "shipped model, zero-shot",
    "X_continued": "shipped model, continued on these cells",
    "X_scratch": "trained from scratch on these cells",
    "X_pca": "PCA of log-normalised genes",
}


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


def run_demo(out: str | Path = "exceiver_demo", *, max_minutes: float = 1.0, seed: int = 0,
             overwrite: bool = False, progress: bool = True) -> str:
    """On 80% of the cells: continue the shipped model for `max_minutes` (unlabelled) and train
    the same architecture from scratch for as long; embed all cells with both, with the shipped
    model as it is, and with PCA; score each by cell-type kNN on the held-out 20%; transfer labels
    from the 80% to the 20% with the continued model (`annotate`). Writes both models, the
    embedded .h5ad, UMAPs and a report. An earlier demo's output folder is replaced; another
    output of exceiver only with `overwrite`; a folder holding anything else never."""
    out = Path(out)
    earlier_demo = out.is_dir() and (out / "demo_metrics.json").is_file() and not foreign_files(out)
    with atomic_dir(out, overwrite=overwrite or earlier_demo) as folder:
        adata = pbmc68k_counts()
        train, test = train_test_split(np.arange(adata.n_obs), test_size=0.2, random_state=seed,
                                       stratify=adata.obs[LABEL])
        train, test = np.sort(train), np.sort(test)
        shipped = Exceiver.pretrained(SHIPPED)
        cells = adata[train].copy()
        models = {
            "X_shipped": shipped,
            "X_continued": pretrain(cells, folder / "continued_model", init=shipped, extend_genes=True,
                                    max_minutes=max_minutes, seed=seed, progress=progress),
            "X_scratch": pretrain(cells, folder / "scratch_model", max_minutes=max_minutes, seed=seed,
                                  progress=progress),
        }
        for key, model in models.items():
            model.embed(adata, key_added=key, progress=progress)
        adata.obsm["X_pca"] = pca_embedding(adata, fit_cells=train, n_hvg=None, seed=seed)
        labels = adata.obs[LABEL].to_numpy()
        scores = {key: knn_scores(adata.obsm[key], labels, train, test) for key in EMBEDDINGS}
        query = adata[test].copy()
        transferred = models["X_continued"].annotate(adata[train].copy(), query, LABEL, inplace=False,
                                                     progress=progress)
        truth, called = query.obs[LABEL].astype(str).to_numpy(), transferred["exceiver_label"].astype(str).to_numpy()
        known = called != "unknown"
        annotation = {"accuracy": float(accuracy_score(truth, called)),
                      "macro_f1": float(f1_score(truth, called, labels=np.unique(truth), average="macro")),
                      "unknown_fraction": float(1 - known.mean()),
                      "accuracy_where_called": float(accuracy_score(truth[known], called[known])) if known.any() else None}
        adata.obs["exceiver_label"] = pd.Series(pd.NA, index=adata.obs_names, dtype="object")
        adata.obs.loc[query.obs_names, "exceiver_label"] = called
        adata.obs["exceiver_label"] = adata.obs["exceiver_label"].astype("category")
        adata.obs["held_out"] = pd.Categorical(np.isin(np.arange(adata.n_obs), test))
        _plot_umaps(adata, folder / "umap.png")
        adata.write_h5ad(folder / "pbmc68k_exceiver.h5ad")
        metrics = {"models": {key: m.metrics for key, m in models.items()}, "knn_k15_held_out": scores,
                   "annotation_held_out": annotation, "n_train_cells": len(train), "n_test_cells": len(test)}
        (folder / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report = _report(models, scores, annotation, len(train), len(test), Path(out))
        (folder / "report.md").write_text(report)
    return report


def _plot_umaps(adata: ad.AnnData, path: Path) -> None:
    fig = Figure(figsize=(13, 11))
    axes = fig.subplots(2, 2).ravel()
    for i, (ax, (key, title)) in enumerate(zip(axes, EMBEDDINGS.items())):
        sc.pp.neighbors(adata, use_rep=key, key_added=key)
        adata.obsm[f"X_umap_{key}"] = sc.tl.umap(adata, neighbors_key=key, copy=True).obsm["X_umap"]
        sc.pl.embedding(adata, basis=f"X_umap_{key}", color=LABEL, ax=ax, show=False, title=title,
                        legend_loc="right margin" if i % 2 else None, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _report(models: dict, scores: dict, annotation: dict, n_train: int, n_test: int, out: Path) -> str:
    continued, scratch, shipped = models["X_continued"], models["X_scratch"], models["X_shipped"]
    rows = "\n".join(f"| {title} | {scores[key]['accuracy']:.3f} | {scores[key]['macro_f1']:.3f} |"
                     for key, title in EMBEDDINGS.items())
    mse = "\n".join(
        f"| {name} | {m.metrics['val_masked_mse']:.4f} | {m.metrics['val_gene_mean_mse']:.4f} | "
        f"{m.metrics['val_mse_ratio']:.3f} | {m.metrics['steps']} steps, {m.metrics['seconds']:.0f} s |"
        for name, m in (("continued", continued), ("from scratch", scratch)))
    unknown = annotation["unknown_fraction"]
    return f"""# exceiver demo: 700 PBMCs (scanpy `pbmc68k_reduced`, counts recovered from `.raw`)

Shipped model `{SHIPPED}`: {shipped} (docs/models.md), pretrained on
{shipped.metrics.get('n_cells', 0):,} human and mouse cells; none of these 700.
Continued on the {n_train} training cells (labels unseen) and, for comparison, the same architecture
trained from scratch on them, each for {continued.metrics['seconds']:.0f} s.

## Cell types from embeddings: kNN (k=15) on {n_test} held-out cells
| embedding | accuracy | macro-F1 |
|---|---|---|
{rows}

## Masked-expression prediction (validation cells)
| model | MSE | gene-mean MSE | ratio | training |
|---|---|---|---|---|
{mse}

## Label transfer to the held-out cells (`annotate`, continued model)
Labels of the {n_train} training cells transferred to the {n_test} held-out ones: accuracy
{annotation['accuracy']:.3f}, macro-F1 {annotation['macro_f1']:.3f}; {unknown:.1%} called "unknown"
(confidence below 0.5){'' if annotation['accuracy_where_called'] is None else f", accuracy {annotation['accuracy_where_called']:.3f} on the others"}.

## Files in {out}
- `continued_model/`, `scratch_model/`: model folders (open with `exceiver.Exceiver.load`)
- `pbmc68k_exceiver.h5ad`: the cells with `obsm` `X_shipped`, `X_continued`, `X_scratch`, `X_pca`,
  and `obs['exceiver_label']` (held-out cells)
- `umap.png`: UMAPs of the four embeddings coloured by cell type
"""
