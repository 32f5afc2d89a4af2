"""The numbers of a shipped model's card, on the files held out of its training
(docs/base_model_plan.md), one run per row, beside what users already use on each file itself.

For each held-out file (cell-type labels):
- zero-shot: kNN macro-F1 (k=15, 5-fold) of the model's embedding, beside the four PCA recipes of
  `exceiver.evaluate` (pca20_hvg2000, pca50_hvg2000, pca20_all, pca50_all: PCA of the file's
  log-normalised counts), and scVI's latent (its defaults, trained on the file: `common.scvi_baseline`);
- labels: `annotate` from a stratified 10% and 20% of the cells to the rest, every cell labelled
  (`min_confidence=0`), macro-F1 beside logistic regression on the reference's HVGs;
- continued: the model continued on the file (`pretrain --init`, labels unseen, `--continued-minutes`),
  its embedding's kNN macro-F1.

    EXCEIVER_SHARED=../shared python benchmarks/model_card.py --model human-mouse-base --out card.json
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from common import (Target, benchmark_parser, labelled_subset, logreg_hvg, read_result, scvi_baseline, shared_folder,
                    threads, write_result)
from exceiver import Exceiver, pretrain
from exceiver.evaluate.baselines import PCA_RECIPES, cell_baselines
from exceiver.evaluate.cells import knn_cross_validated
from exceiver.inference import cell_embedding

CARD_TARGETS = [Target("pbmc3k_seurat_2638", "cell_type"),
                Target("gpsfish_zeisel_mouse_cortex_550", "cell_type", species="mouse"),
                Target("card_pdac_1926_7kgenes", "cell_type")]
FRACTIONS = (0.1, 0.2)


def knn(embedding: np.ndarray, labels: np.ndarray, seed: int) -> float:
    return knn_cross_validated(embedding, labels, seed=seed)["knn_macro_f1"]


def zero_shot(model: Exceiver, adata, labels: np.ndarray, seed: int, with_scvi: bool) -> dict:
    """The model's embedding and the file's own baselines, kNN macro-F1 each."""
    row = {"exceiver": knn(cell_embedding(model, model.read(adata), progress=False), labels, seed)}
    baselines = cell_baselines(adata, seed=seed)
    row |= {name: knn(baselines[name], labels, seed) for name in PCA_RECIPES}
    row["best_pca"] = max(row[name] for name in PCA_RECIPES)
    if with_scvi:
        scvi_model, seconds = scvi_baseline(adata)
        row["scvi"], row["scvi_seconds"] = knn(scvi_model.get_latent_representation(), labels, seed), round(seconds)
    return row


def label_transfer(model: Exceiver, adata, target: Target, seed: int) -> dict:
    """annotate vs logistic regression on HVGs, from a stratified fraction of the cells to the rest."""
    row = {}
    labels = adata.obs[target.label_key].astype(str)
    for fraction in FRACTIONS:
        reference = np.zeros(adata.n_obs, dtype=bool)
        reference[labelled_subset(labels, fraction, seed)] = True
        ref, query = adata[reference].copy(), adata[~reference].copy()
        truth = labels[~reference].to_numpy()
        annotated = model.annotate(ref, query, target.label_key, min_confidence=0.0, inplace=False, progress=False)
        logreg = logreg_hvg(ref, query, target.label_key, target.gene_key, seed)
        row[f"annotate_{fraction:.0%}"] = f1_score(truth, annotated["exceiver_label"].astype(str), average="macro")
        row[f"logreg_hvg_{fraction:.0%}"] = f1_score(truth, logreg, average="macro")
    return row


def continued(model: Exceiver, adata, labels: np.ndarray, minutes: float, seed: int) -> float:
    """The model continued on the file itself (labels unseen), its embedding's kNN macro-F1."""
    own = pretrain(adata, None, init=model, max_minutes=minutes, max_epochs=100_000, seed=seed, progress=False)
    return knn(cell_embedding(own, own.read(adata), progress=False), labels, seed)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", required=True, help="a model folder or a shipped model's name")
    parser.add_argument("--out", type=Path, required=True, help="results JSON (files already in it are kept)")
    parser.add_argument("--continued-minutes", type=float, default=3.0)
    parser.add_argument("--no-scvi", action="store_true", help="leave scVI out (it needs the [bench] extra)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    shared, model = shared_folder(), Exceiver.load(args.model)
    results = {row["file"]: row for row in read_result(args.out, [])}
    for target in CARD_TARGETS:
        if target.file in results:
            continue
        start = time.time()
        adata = target.read(shared / "data")
        labels = target.labels(adata)
        row = {"file": target.file, "model": args.model, "cells": adata.n_obs,
               "zero_shot": zero_shot(model, adata, labels, args.seed, not args.no_scvi),
               "labels": label_transfer(model, adata, target, args.seed),
               "continued": continued(model, adata, labels, args.continued_minutes, args.seed)}
        row["seconds"] = round(time.time() - start)
        results[target.file] = row
        write_result(list(results.values()), args.out)
        print(row, flush=True)
    print(table(list(results.values())))


def table(rows: list[dict]) -> str:
    """One line per file: zero-shot beside the best PCA and scVI, labels beside logistic regression."""
    lines = ["| file | zero-shot | best PCA | scVI | annotate 10% | logreg 10% | annotate 20% | logreg 20% | continued |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z, lab = r["zero_shot"], r["labels"]
        scvi = f"{z['scvi']:.3f}" if "scvi" in z else "not run"
        lines.append(f"| {r['file']} | {z['exceiver']:.3f} | {z['best_pca']:.3f} | {scvi} | {lab['annotate_10%']:.3f} | "
                     f"{lab['logreg_hvg_10%']:.3f} | {lab['annotate_20%']:.3f} | {lab['logreg_hvg_20%']:.3f} | "
                     f"{r['continued']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
