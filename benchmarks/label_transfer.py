"""Label transfer (`exceiver annotate`): which read-out of the cell embedding, and which confidence
threshold, beside PCA of the same cells.

Tasks (macro-F1 and accuracy on the query cells, which no label of theirs reaches):
  pbmc3k cell_type, a random 10% of the cells as labelled reference (seeds 0-2), the rest as query;
  cellbench cell line, CEL-seq2 cells as reference and Drop-seq cells as query (a change of technology);
  kang2018 condition (IFN-beta stimulated or not), a random 10% as reference (seeds 0-2).
Models: `own` (the default preset pretrained for --pretrain-minutes on the task's file itself,
labels unseen) and any model folders given with --model NAME=DIR (e.g. a corpus model); `pca`
(`pca_hvg2000_seurat_50` in the tables): 50 components of the file's log-normalised 2,000 most
variable genes, unscaled, through the same read-outs.
Also: the share of cells called "unknown" and the accuracy of the others per threshold, and on
pbmc3k a cell type left out of the reference (are its query cells called "unknown"?).

    EXCEIVER_SHARED=../shared python benchmarks/label_transfer.py --out label_transfer \
        --model corpus=../study/counts_log_values_flat_bottleneck/model
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, f1_score

from common import (LABEL_TASKS as TASKS, benchmark_parser, pca_hvg2000_seurat_50, pca_legend, reference_cells,
                    shared_folder)
from exceiver import Exceiver, pretrain
from exceiver.io import write_csv
from exceiver.tl.annotation import METHODS, UNKNOWN, transfer

PCA_RECIPE = "pca_hvg2000_seurat_50"  # the model named "pca" in results.csv
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
HELD_OUT = "B"  # the pbmc3k type left out of the reference


def splits(task: str, adata: ad.AnnData, seeds: list[int]) -> list[tuple[int, np.ndarray]]:
    """(seed, reference mask) of a task: cellbench's one (its reference is a technology), else one per seed."""
    seeds = [0] if task == "cellbench_cell_line" else seeds
    return [(seed, reference_cells(task, adata, seed)) for seed in seeds]


def scores(truth: np.ndarray, proba: np.ndarray, classes: np.ndarray, threshold: float) -> dict:
    pred = classes[proba.argmax(1)].astype(object)
    unknown = proba.max(1) < threshold
    pred[unknown] = UNKNOWN
    labels = sorted(set(truth) | (set(pred) - {UNKNOWN}))
    called = ~unknown
    return {"macro_f1": f1_score(truth, pred, labels=labels, average="macro", zero_division=0),
            "accuracy": accuracy_score(truth, pred), "unknown": float(unknown.mean()),
            "called_accuracy": accuracy_score(truth[called], pred[called]) if called.any() else float("nan")}


def evaluate(name: str, task: str, embedding: np.ndarray, labels: np.ndarray, refs: list) -> list[dict]:
    rows = []
    for seed, ref in refs:
        classes, codes = np.unique(labels[ref], return_inverse=True)
        for method, k in [*((m, 15) for m in METHODS), ("knn", 5), ("knn", 30)]:
            proba = transfer(embedding[ref], codes, len(classes), embedding[~ref], method=method, n_neighbors=k)
            for threshold in THRESHOLDS:
                rows.append({"task": task, "model": name, "method": method, "k": k if method == "knn" else None,
                             "seed": seed, "threshold": threshold,
                             **scores(labels[~ref], proba, classes, threshold)})
        if task == "pbmc3k_cell_type":  # a type the reference lacks: its query cells should be unknown
            kept = ref & (labels != HELD_OUT)
            classes, codes = np.unique(labels[kept], return_inverse=True)
            novel = labels[~ref] == HELD_OUT
            for method in METHODS:
                confidence = transfer(embedding[kept], codes, len(classes), embedding[~ref], method=method).max(1)
                for threshold in THRESHOLDS:
                    rows.append({"task": f"pbmc3k_without_{HELD_OUT}", "model": name, "method": method,
                                 "k": 15 if method == "knn" else None, "seed": seed, "threshold": threshold,
                                 "unknown_novel": float((confidence[novel] < threshold).mean()),
                                 "unknown_known": float((confidence[~novel] < threshold).mean())})
    return rows


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, default=Path("label_transfer"))
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a pretrained model folder")
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = shared_folder() / "data"
    args.out.mkdir(parents=True, exist_ok=True)
    models = dict(item.split("=", 1) for item in args.model)
    rows = []
    for task, target in TASKS.items():
        adata = target.read(data)
        labels = target.labels(adata)
        refs = splits(task, adata, args.seeds)
        own = args.out / "models" / target.file
        if not own.exists():
            pretrain(adata, own, max_minutes=args.pretrain_minutes, progress=False)
        for name, folder in [("own", own), *models.items()]:
            model = Exceiver.load(folder)
            gene_key = target.gene_key if name != "own" else None  # the corpus models know genes by symbol
            embedding = model.embed(adata, inplace=False, gene_key=gene_key, progress=False)
            rows += evaluate(name, task, embedding, labels, refs)
        rows += evaluate("pca", task, pca_hvg2000_seurat_50(adata), labels, refs)
        print(f"{task}: done", flush=True)
    table = pd.DataFrame(rows)
    write_csv(table, args.out / "results.csv", overwrite=True)
    report(table)


def report(table: pd.DataFrame) -> None:
    """The tables of results.csv; its model "pca" printed as its recipe's key."""
    table = table.replace({"model": {"pca": PCA_RECIPE}})
    tasks = table["task"].isin(list(TASKS))
    k15 = table["method"].eq("linear") | table["k"].eq(15)
    at_zero = table[tasks & k15 & table["threshold"].eq(0)]
    print("\nmacro-F1 on the query cells (mean and sd over seeds), no threshold:")
    print(at_zero.pivot_table(index=["task", "model"], columns="method", values="macro_f1",
                              aggfunc=["mean", "std"]).round(3).to_string())
    print("\nkNN neighbours, macro-F1:")
    knn = table[tasks & table["method"].eq("knn") & table["threshold"].eq(0)]
    print(knn.pivot_table(index=["task", "model"], columns="k", values="macro_f1").round(3).to_string())
    print("\nthresholds, mean over tasks: share unknown, accuracy of the called cells, macro-F1:")
    print(table[tasks & k15].pivot_table(index=["model", "method", "threshold"],
                                         values=["unknown", "called_accuracy", "macro_f1"]).round(3).to_string())
    print(f"\npbmc3k without {HELD_OUT} in the reference: share unknown of its query cells vs the others:")
    print(table[table["task"].str.contains("without")].pivot_table(
        index=["model", "method", "threshold"], values=["unknown_novel", "unknown_known"]).round(3).to_string())
    print(pca_legend([PCA_RECIPE]))


if __name__ == "__main__":
    main()
