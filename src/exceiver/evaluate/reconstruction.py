"""Masked-expression reconstruction on held-out cells, beside the baselines a model must beat.

Each cell's expressed genes are masked as in pretraining (a fixed salt: the same genes for every
model); the model predicts them from the rest. Baselines see exactly the visible values:
gene mean (mean visible value of the gene over the evaluated cells) and kNN imputation (the mean
visible value of the gene over the cell's 15 nearest neighbours in a PCA of visible values).
All values are in the model's value space (log-normalised expression, or z-scored + 1 for `paper`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.decomposition import TruncatedSVD
from sklearn.neighbors import NearestNeighbors

from exceiver.data.cells import CellCounts
from exceiver.data.preprocess import GeneScaler
from exceiver.data.tokenizer import TokenizerConfig
from exceiver.inference import iterate_batches
from exceiver.nn.network import ExceiverModule

EVAL_SALT = 20221017  # fixed masks: every model is judged on the same masked genes


@torch.inference_mode()
def masked_predictions(module: ExceiverModule, cells: CellCounts, scaler: GeneScaler, tokenizer: TokenizerConfig,
                       *, device: torch.device, batch_size: int = 32, progress: bool = True) -> dict[str, np.ndarray]:
    """Masked entries (cell, gene, target, model prediction) and visible entries (cell, gene,
    value) of every cell, from the same tokenisation the model is trained with."""
    module.eval()
    masked, visible = [], []
    for batch in iterate_batches(cells, scaler, tokenizer, batch_size=batch_size, device=device, progress=progress,
                                 desc="reconstructing", masked=True, salt=EVAL_SALT):
        pred = module(batch).float()
        q = batch.query_mask & ~batch.query_is_zero
        rows = batch.cells[:, None].expand_as(q)
        masked.append(torch.stack([rows[q].cpu().double(), batch.query_ids[q].cpu().double(),
                                   batch.targets[q].cpu().double(), pred[q].cpu().double()]).numpy())
        t = batch.token_mask & ~batch.token_zero
        rows = batch.cells[:, None].expand_as(t)
        visible.append(torch.stack([rows[t].cpu().double(), batch.gene_ids[t].cpu().double(),
                                    batch.values[t].cpu().double()]).numpy())
    m, v = np.concatenate(masked, axis=1), np.concatenate(visible, axis=1)
    return {"cell": m[0].astype(np.int64), "gene": m[1].astype(np.int64), "target": m[2], "model": m[3],
            "visible_cell": v[0].astype(np.int64), "visible_gene": v[1].astype(np.int64), "visible_value": v[2]}


def baseline_predictions(entries: dict[str, np.ndarray], n_cells: int, n_genes: int, *, k: int = 15,
                         n_comps: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """Gene-mean and kNN predictions of the masked entries from the visible ones only."""
    visible = sp.csr_matrix((entries["visible_value"], (entries["visible_cell"], entries["visible_gene"])),
                            shape=(n_cells, n_genes))
    detected = visible.copy()
    detected.data[:] = 1.0
    totals = np.asarray(visible.sum(0)).ravel()
    counts = np.asarray(detected.sum(0)).ravel()
    overall = totals.sum() / max(counts.sum(), 1)
    gene_mean = np.where(counts > 0, totals / np.maximum(counts, 1), overall)
    cell, gene = entries["cell"], entries["gene"]

    n_comps = max(1, min(n_comps, n_cells - 1, n_genes - 1))
    coords = TruncatedSVD(n_components=n_comps, random_state=seed).fit_transform(visible)
    k = max(1, min(k, n_cells - 1))
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords, return_distance=False)
    neighbours = neighbours[:, 1:]  # not the cell itself
    # Sum and number of the neighbours' visible values of each masked gene, gene by gene of each cell.
    nb = neighbours[cell]  # [entries, k]
    sums = np.zeros(len(cell))
    hits = np.zeros(len(cell))
    for j in range(k):
        values = np.asarray(visible[nb[:, j], gene]).ravel()
        sums += values
        hits += values != 0
    knn = np.where(hits > 0, sums / np.maximum(hits, 1), gene_mean[gene])
    return {"gene_mean": gene_mean[gene], "knn": knn}


def _scores(target: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    err = pred - target
    mse = float(np.mean(err**2))
    var = float(np.var(target))
    r = float(np.corrcoef(target, pred)[0, 1]) if len(target) > 1 and np.std(pred) > 0 else float("nan")
    return {"mse": mse, "pearson": r, "explained_variance": float(1 - np.var(err) / var) if var > 0 else float("nan"),
            "n": int(len(target))}


def reconstruction_scores(entries: dict[str, np.ndarray], baselines: dict[str, np.ndarray],
                          n_bins: int = 10) -> dict:
    """MSE, Pearson r and explained variance of each method, overall and per decile of the true
    value; `mse_ratio` is the model's MSE over the gene-mean baseline's."""
    target = entries["target"]
    preds = {"model": entries["model"], **baselines}
    overall = {name: _scores(target, p) for name, p in preds.items()}
    for name in overall:
        overall[name]["mse_ratio"] = overall[name]["mse"] / overall["gene_mean"]["mse"]
    edges = np.quantile(target, np.linspace(0, 1, n_bins + 1))
    decile = np.clip(np.searchsorted(edges, target, side="right") - 1, 0, n_bins - 1)
    deciles = []
    for d in range(n_bins):
        sel = decile == d
        if sel.sum() < 2:
            continue
        deciles.append({"decile": d + 1, "low": float(edges[d]), "high": float(edges[d + 1]),
                        **{name: _scores(target[sel], p[sel]) for name, p in preds.items()}})
    return {**overall, "deciles": deciles, "n_cells": int(len(np.unique(entries["cell"])))}
