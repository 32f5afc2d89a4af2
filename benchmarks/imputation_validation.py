"""Imputation of held-out values: the model against kNN smoothing and gene means.

On kang2018 (not in the pretraining corpus), 10% of each cell's expressed genes are held out
(their counts removed from the input), then predicted from the rest. Targets are the held-out
log-normalised values (library of the full cell). Scores: Pearson r and MSE over all held-out
entries, mean within-gene Pearson r across cells (genes with >= 20 held-out entries: does the
prediction follow the cell, beyond the gene's average?), and the AUROC of telling held-out
expressed genes from as many undetected genes of the same cell (do predictions for undetected
genes sit lower?). Baselines, computed on the same masked input: each gene's mean over the cells
that express it (its detection rate for the AUROC), and kNN smoothing (mean over the 15 nearest
cells in a 50-component PCA of the masked data; zeros included, or over the neighbours that express
the gene).

    EXCEIVER_SHARED=../shared python benchmarks/imputation_validation.py --model /tmp/transfer/pretrained
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="model folder (repeatable)")
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shared = Path(os.environ.get("EXCEIVER_SHARED", "../shared"))
    rng = np.random.default_rng(args.seed)
    paths = args.model or [Path("/tmp/transfer/pretrained")]
    models = [Exceiver.load(m) for m in paths]

    kang = ad.read_h5ad(shared / "data" / "kang2018_ifnb_harmony_2000.h5ad")
    kang = kang[np.sort(rng.choice(kang.n_obs, size=min(args.cells, kang.n_obs), replace=False))]
    # Genes every model can predict, so that all methods are scored on the same entries.
    keep = np.ones(kang.n_vars, dtype=bool)
    for model in models:
        ids = model.vocab.ids(list(kang.var_names))
        keep &= ids >= 0
        keep[keep] &= model.scaler.trained_genes[ids[keep]]
    kang = kang[:, keep].copy()
    counts = sp.csr_matrix(kang.X)
    counts = counts[np.asarray(counts.sum(1)).ravel() > 0]
    library = np.asarray(counts.sum(1)).ravel()  # full library, over the genes kept
    masked, rows, cols = hold_out(counts, args.fraction, rng)
    zero_cols = undetected(counts, rows, rng)
    truth = np.asarray(log_normalised(counts, library)[rows, cols]).ravel()
    print(f"kang2018: {counts.shape[0]} cells x {counts.shape[1]} genes; {len(rows):,} held-out entries "
          f"({args.fraction:.0%} of each cell's expressed genes)")

    observed = log_normalised(masked, np.asarray(masked.sum(1)).ravel())
    results = {}
    detected = np.asarray((masked > 0).sum(0)).ravel()
    expressed_mean = np.asarray(observed.sum(0)).ravel() / np.maximum(detected, 1)
    expressed_mean[detected == 0] = observed.data.mean()
    gene_mean = scores(expressed_mean[cols], truth, cols, None)
    gene_mean["auroc_expressed_vs_zero"] = float(roc_auc_score(  # ranked by detection rate
        np.r_[np.ones(len(cols)), np.zeros(len(zero_cols))], np.r_[detected[cols], detected[zero_cols]]))
    results["gene mean (expressing cells)"] = gene_mean
    pcs = TruncatedSVD(50, random_state=args.seed).fit_transform(observed)  # uncentred: stays sparse
    neighbours = NearestNeighbors(n_neighbors=16).fit(pcs).kneighbors(pcs, return_distance=False)[:, 1:]
    smooth = sp.csr_matrix((np.ones(neighbours.size) / 15, (np.repeat(np.arange(len(pcs)), 15), neighbours.ravel())),
                           shape=(len(pcs), len(pcs)))
    knn = smooth @ observed
    knn_detected = smooth @ (observed > 0).astype(np.float64)
    knn_value = np.asarray(knn[rows, cols]).ravel()
    results["kNN smoothing (k=15, zeros included)"] = scores(knn_value, truth, cols,
                                                             np.asarray(knn[rows, zero_cols]).ravel())
    share = np.asarray(knn_detected[rows, cols]).ravel()
    knn_expressed = np.where(share > 0, knn_value / np.maximum(share, 1e-12), expressed_mean[cols])
    results["kNN smoothing (k=15, expressing neighbours)"] = scores(knn_expressed, truth, cols, None)

    masked_adata = ad.AnnData(masked, obs=pd.DataFrame(index=np.arange(masked.shape[0]).astype(str)),
                              var=pd.DataFrame(index=kang.var_names))
    genes = np.asarray(kang.var_names)
    for path, model in zip(paths, models):
        start = time.time()
        needed = np.unique(np.r_[cols, zero_cols])
        imputed = impute(model, masked_adata, list(genes[needed]), progress=False)
        column = np.searchsorted(needed, cols)
        zero_column = np.searchsorted(needed, zero_cols)
        name = f"exceiver {path.name} (zero_query_ratio {model.tokenizer.zero_query_ratio})"
        results[name] = scores(imputed[rows, column], truth, cols, imputed[rows, zero_column])
        print(f"imputed with {path} in {time.time() - start:.0f} s")

    table = pd.DataFrame(results).T
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
