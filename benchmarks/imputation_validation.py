"""Imputation of held-out values: the model's two readings against kNN smoothing and gene means.

On each dataset (kang2018 and pbmc3k by default; human PBMCs), 10% of each cell's expressed genes
are held out (their counts removed from the input), then predicted from the rest. Targets are the
held-out log-normalised values (library of the full cell). Scores: Pearson r and MSE over all
held-out entries, mean within-gene Pearson r across cells (genes with >= 20 held-out entries: does
the prediction follow the cell, beyond the gene's average?), and the AUROC of telling held-out
expressed genes from as many undetected genes of the same cell (do predictions for undetected
genes sit lower?). Baselines, computed on the same masked input: each gene's mean over the cells
that express it (its detection rate for the AUROC), and kNN smoothing (mean over the 15 nearest
cells in a 50-component PCA of the masked data; zeros included, or over the neighbours that express
the gene). Each model imputes twice: `method="counts"` (the count decoder's expected expression,
zeros averaged in: its like is kNN with zeros included) and `method="values"` (the value head's
level if expressed: its like is kNN over expressing neighbours). Ratios of each to both kNN rows
are printed (above 1 is better, except MSE: below 1; a ratio to a score near 0, such as the
within-gene r of kNN with zeros included, says little).

The shipped `human-mouse-small` was pretrained on every shared file but pbmc_small, these two
included: it has seen these cells whole, held-out counts too, which kNN smoothing cannot.

    EXCEIVER_SHARED=../shared python benchmarks/imputation_validation.py --model human-mouse-small
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.decomposition import TruncatedSVD
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from exceiver import Exceiver
from exceiver.tl import impute


def hold_out(counts: sp.csr_matrix, fraction: float, rng) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Masked counts and the (cell, gene) of held-out entries: `fraction` of each cell's expressed
    genes, at least one, never all."""
    rows, cols = [], []
    masked = counts.tolil(copy=True)
    for i in range(counts.shape[0]):
        genes = counts.indices[counts.indptr[i]:counts.indptr[i + 1]]
        k = min(max(1, round(fraction * len(genes))), len(genes) - 1)
        picked = rng.choice(genes, size=k, replace=False)
        rows.extend([i] * k)
        cols.extend(picked)
        masked[i, picked] = 0
    masked = masked.tocsr()
    masked.eliminate_zeros()
    return masked, np.asarray(rows), np.asarray(cols)


def undetected(counts: sp.csr_matrix, rows: np.ndarray, rng) -> np.ndarray:
    """One undetected gene of the same cell for each held-out entry."""
    out = np.empty(len(rows), dtype=np.int64)
    for n, i in enumerate(rows):
        expressed = set(counts.indices[counts.indptr[i]:counts.indptr[i + 1]])
        while (g := int(rng.integers(counts.shape[1]))) in expressed:
            pass
        out[n] = g
    return out


def log_normalised(counts: sp.csr_matrix, library: np.ndarray) -> sp.csr_matrix:
    out = sp.diags(1e4 / library) @ counts
    out.data = np.log1p(out.data)
    return sp.csr_matrix(out)


def scores(pred: np.ndarray, truth: np.ndarray, genes: np.ndarray, zero_pred: np.ndarray | None) -> dict:
    within = [np.corrcoef(pred[genes == g], truth[genes == g])[0, 1] for g in np.unique(genes)
              if (genes == g).sum() >= 20 and pred[genes == g].std() > 1e-6]
    out = {"pearson": float(np.corrcoef(pred, truth)[0, 1]), "mse": float(np.mean((pred - truth) ** 2)),
           "within_gene_pearson": float(np.nanmean(within)) if within else float("nan"), "n_genes_within": len(within)}
    if zero_pred is not None:
        out["auroc_expressed_vs_zero"] = float(roc_auc_score(np.r_[np.ones(len(pred)), np.zeros(len(zero_pred))],
                                                             np.r_[pred, zero_pred]))
    return out


KNN_ZEROS, KNN_EXPRESSING = "kNN smoothing (k=15, zeros included)", "kNN smoothing (k=15, expressing neighbours)"
DATASETS = ["kang2018_ifnb_harmony_2000", "pbmc3k_seurat_2638"]
METHODS = ("counts", "values")


def held_out_task(adata: ad.AnnData, models: list, max_cells: int, fraction: float, rng) -> dict:
    """At most `max_cells` cells of `adata` restricted to genes every model can predict (so that
    all methods are scored on the same entries), with `fraction` of each cell's expressed genes
    held out, one undetected gene per held-out entry, and the held-out log-normalised truth."""
    adata = adata[np.sort(rng.choice(adata.n_obs, size=min(max_cells, adata.n_obs), replace=False))]
    keep = np.ones(adata.n_vars, dtype=bool)
    for model in models:
        ids = model.vocab.ids(list(adata.var_names))
        keep &= ids >= 0
        keep[keep] &= model.scaler.trained_genes[ids[keep]]
    adata = adata[:, keep]
    counts = sp.csr_matrix(adata.X)
    counts = counts[np.asarray(counts.sum(1)).ravel() > 0]
    library = np.asarray(counts.sum(1)).ravel()  # full library, over the genes kept
    masked, rows, cols = hold_out(counts, fraction, rng)
    return {"masked": masked, "rows": rows, "cols": cols, "zero_cols": undetected(counts, rows, rng),
            "truth": np.asarray(log_normalised(counts, library)[rows, cols]).ravel(),
            "genes": np.asarray(adata.var_names), "shape": counts.shape}


def baselines(task: dict, seed: int) -> dict:
    """Gene means and kNN smoothing of the masked data, scored on the held-out entries."""
    masked, rows, cols, zero_cols, truth = (task[k] for k in ("masked", "rows", "cols", "zero_cols", "truth"))
    observed = log_normalised(masked, np.asarray(masked.sum(1)).ravel())
    results = {}
    detected = np.asarray((masked > 0).sum(0)).ravel()
    expressed_mean = np.asarray(observed.sum(0)).ravel() / np.maximum(detected, 1)
    expressed_mean[detected == 0] = observed.data.mean()
    gene_mean = scores(expressed_mean[cols], truth, cols, None)
    gene_mean["auroc_expressed_vs_zero"] = float(roc_auc_score(  # ranked by detection rate
        np.r_[np.ones(len(cols)), np.zeros(len(zero_cols))], np.r_[detected[cols], detected[zero_cols]]))
    results["gene mean (expressing cells)"] = gene_mean
    pcs = TruncatedSVD(50, random_state=seed).fit_transform(observed)  # uncentred: stays sparse
    neighbours = NearestNeighbors(n_neighbors=16).fit(pcs).kneighbors(pcs, return_distance=False)[:, 1:]
    smooth = sp.csr_matrix((np.ones(neighbours.size) / 15, (np.repeat(np.arange(len(pcs)), 15), neighbours.ravel())),
                           shape=(len(pcs), len(pcs)))
    knn = smooth @ observed
    knn_detected = smooth @ (observed > 0).astype(np.float64)
    knn_value = np.asarray(knn[rows, cols]).ravel()
    results[KNN_ZEROS] = scores(knn_value, truth, cols, np.asarray(knn[rows, zero_cols]).ravel())
    share = np.asarray(knn_detected[rows, cols]).ravel()
    knn_expressed = np.where(share > 0, knn_value / np.maximum(share, 1e-12), expressed_mean[cols])
    results[KNN_EXPRESSING] = scores(knn_expressed, truth, cols, None)
    return results


def model_scores(model: Exceiver, label: str, task: dict) -> dict:
    """`impute` of the held-out and undetected genes from the masked data, with each method."""
    masked, rows, cols, zero_cols = (task[k] for k in ("masked", "rows", "cols", "zero_cols"))
    masked_adata = ad.AnnData(masked, obs=pd.DataFrame(index=np.arange(masked.shape[0]).astype(str)),
                              var=pd.DataFrame(index=task["genes"]))
    needed = np.unique(np.r_[cols, zero_cols])
    column, zero_column = np.searchsorted(needed, cols), np.searchsorted(needed, zero_cols)
    results = {}
    for method in METHODS:
        start = time.time()
        imputed = impute(model, masked_adata, list(task["genes"][needed]), method=method, progress=False)
        results[f"exceiver {label} {method}"] = scores(imputed[rows, column], task["truth"], cols,
                                                        imputed[rows, zero_column])
        print(f"imputed with {label}, method={method!r}, in {time.time() - start:.0f} s")
    return results


def ratios(results: dict) -> pd.DataFrame:
    """Each exceiver row's scores divided by each kNN smoothing row's."""
    table = pd.DataFrame(results).T.drop(columns="n_genes_within")
    return pd.DataFrame({f"{name} / {knn}": table.loc[name] / table.loc[knn]
                         for name in table.index if name.startswith("exceiver")
                         for knn in (KNN_ZEROS, KNN_EXPRESSING)}).T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model folder or shipped name (repeatable)")
    parser.add_argument("--data", action="append", help=f"shared data file stem (repeatable; default {DATASETS})")
    parser.add_argument("--max-cells", type=int, default=1000, help="cells drawn at random from each dataset")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shared = Path(os.environ.get("EXCEIVER_SHARED", "../shared"))
    names = args.model or ["human-mouse-small"]
    models = [Exceiver.load(m) for m in names]
    everything = {}
    for stem in args.data or DATASETS:
        rng = np.random.default_rng(args.seed)
        task = held_out_task(ad.read_h5ad(shared / "data" / f"{stem}.h5ad"), models, args.max_cells,
                             args.fraction, rng)
        print(f"\n{stem}: {task['shape'][0]} cells x {task['shape'][1]} genes; {len(task['rows']):,} held-out "
              f"entries ({args.fraction:.0%} of each cell's expressed genes)")
        results = baselines(task, args.seed)
        for name, model in zip(names, models):
            results.update(model_scores(model, Path(name).name, task))
        print(pd.DataFrame(results).T.to_string(float_format=lambda v: f"{v:.3f}"))
        print("ratios to kNN smoothing (above 1 is better; mse: below 1 is better)")
        print(ratios(results).to_string(float_format=lambda v: f"{v:.3f}"))
        everything[stem] = results
    if args.out:
        args.out.write_text(json.dumps(everything, indent=1) + "\n")


if __name__ == "__main__":
    main()
