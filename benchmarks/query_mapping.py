"""Query mapping as scArches does it: a model trained on one batch (the reference) is continued on a
new batch (the query) with every weight frozen but the new batch's rows; do the query's cells land
among the reference's cells of the same type, and do the reference's cells stay where they were?

On cellbench (three lung-cancer cell lines, two technologies), in one run, same threads:
- exceiver: `pretrain` from scratch on the reference batch with the batch key, then
  `pretrain(query, init=reference_model, batch_key=..., freeze_except_batches=True)`; the reference
  is embedded by both models, and `annotate` (logistic regression on the embedding, its default)
  carries the reference's labels to the query;
- scVI with scArches (scvi-tools' `load_query_data`, the settings of its scArches tutorial:
  covariates encoded, layer norm, no batch norm; the query trained with weight decay 0), the
  labels carried by logistic regression on its latent space, as `annotate` does on exceiver's.

Scores: the query's macro-F1 (cells called "unknown" count as wrong); how far each reference cell
moved between the two models, divided by its distance to its nearest reference neighbour in the
first (below 1: it kept its place among its neighbours), as the median and the share of cells
below 1.

    pip install -c benchmarks/constraints.txt -e ".[bench]"
    EXCEIVER_SHARED=../shared python benchmarks/query_mapping.py --out query_mapping.json --threads 2
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors

from common import (TARGETS, add_model_overrides_option, add_threads_option, benchmark_parser, quiet,
                    read_result, seurat_v3_genes, shared_folder, threads, write_result)
from exceiver import pretrain


def reference_movement(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Each reference cell's displacement between two embeddings of it, divided by its distance to
    its nearest other reference cell in `before` (below 1: it stayed closer to its old place than
    its nearest neighbour is)."""
    distances, _ = NearestNeighbors(n_neighbors=2).fit(before).kneighbors(before)
    return np.linalg.norm(after - before, axis=1) / np.maximum(distances[:, 1], 1e-12)


def movement_summary(ratios: np.ndarray) -> dict:
    return {"median_movement": float(np.median(ratios)), "share_moved_less": float(np.mean(ratios < 1))}


def macro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Macro-F1 over the true labels' classes ("unknown" or any label not among them counts as wrong)."""
    return float(f1_score(truth, predicted, labels=np.unique(truth), average="macro"))


def exceiver_query_step(reference, query, target, args) -> dict:
    """Reference model from scratch, the query step, and its scores."""
    reading = {"gene_key": target.gene_key} if target.gene_key else {}
    common = dict(gene_key=target.gene_key, batch_key=target.batch_key, max_epochs=100_000, patience=100_000,
                  seed=0, progress=False)
    start = time.perf_counter()
    model = pretrain(reference, None, model=dict(args.model), max_minutes=args.minutes, **common)
    trained = time.perf_counter() - start
    before = model.embed(reference, inplace=False, progress=False, **reading)
    start = time.perf_counter()
    mapped = pretrain(query, None, init=model, freeze_except_batches=True, max_minutes=args.query_minutes, **common)
    query_seconds = time.perf_counter() - start
    after = mapped.embed(reference, inplace=False, progress=False, **reading)
    calls = mapped.annotate(reference, query, target.label_key, inplace=False, progress=False, **reading)
    return {"reference_seconds": trained, "query_seconds": query_seconds, "query_steps": mapped.metrics["steps"],
            "macro_f1": macro_f1(target.labels(query), calls["exceiver_label"].astype(str).to_numpy()),
            **movement_summary(reference_movement(before, after))}


def scvi_query_step(reference, query, target, args) -> dict:
    """scVI on the reference and scArches' query step (`SCVI.load_query_data`), labels by logistic
    regression on the latent space; the reference's HVGs are the query's genes."""
    import anndata as ad
    import scvi

    scvi.settings.seed = 0
    counts = ad.AnnData(reference.X.astype(np.float32), obs=reference.obs[[target.batch_key]].copy(),
                        var=reference.var[[]].copy())
    counts = counts[:, np.asarray((counts.X > 0).sum(0)).ravel() > 0].copy()
    seurat_v3_genes(counts, None)
    scvi.model.SCVI.setup_anndata(counts, batch_key=target.batch_key)
    model = scvi.model.SCVI(counts, use_layer_norm="both", use_batch_norm="none", encode_covariates=True,
                            dropout_rate=0.2, n_layers=2)
    start = time.perf_counter()
    model.train(accelerator="cpu", enable_progress_bar=False, max_epochs=100_000,
                max_time={"seconds": args.minutes * 60})
    trained = time.perf_counter() - start
    before = model.get_latent_representation()
    new = ad.AnnData(query[:, counts.var_names].X.astype(np.float32), obs=query.obs[[target.batch_key]].copy(),
                     var=counts.var[[]].copy())
    mapped = scvi.model.SCVI.load_query_data(new, model)
    start = time.perf_counter()
    mapped.train(accelerator="cpu", enable_progress_bar=False, max_epochs=100_000,
                 max_time={"seconds": args.query_minutes * 60}, plan_kwargs={"weight_decay": 0.0})
    query_seconds = time.perf_counter() - start
    after = mapped.get_latent_representation(counts)
    classifier = LogisticRegression(max_iter=2000).fit(before, target.labels(reference))
    predicted = classifier.predict(mapped.get_latent_representation(new))
    return {"reference_seconds": trained, "query_seconds": query_seconds,
            "macro_f1": macro_f1(target.labels(query), predicted),
            **movement_summary(reference_movement(before, after))}


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--reference-batch", default="CEL-seq2", help="the batch the reference model is trained on")
    parser.add_argument("--minutes", type=float, default=2.0, help="training time of each reference model")
    parser.add_argument("--query-minutes", type=float, default=1.0, help="training time of each query step")
    add_model_overrides_option(parser, "override a field of the reference model's preset (repeat for several)")
    add_threads_option(parser)
    args = parser.parse_args()
    quiet()
    threads(args.threads)
    target = TARGETS["cellbench"]
    adata = target.read(shared_folder() / "data")
    batches = adata.obs[target.batch_key].astype(str).to_numpy()
    if args.reference_batch not in set(batches):
        parser.error(f"--reference-batch {args.reference_batch!r} is not one of {sorted(set(batches))}")
    reference, query = adata[batches == args.reference_batch].copy(), adata[batches != args.reference_batch].copy()
    settings = {key: vars(args)[key] for key in ("reference_batch", "minutes", "query_minutes")} | {
        "model": dict(args.model), "reference_cells": reference.n_obs, "query_cells": query.n_obs}
    results = read_result(args.out, {})
    if results.get("settings") != settings:
        results = {"settings": settings}
    for name, step in (("exceiver", exceiver_query_step), ("scvi_scarches", scvi_query_step)):
        if name not in results:
            threads(args.threads)
            results[name] = step(reference, query, target, args)
            write_result(results, args.out)
    print(f"\nreference: {settings['reference_cells']} {args.reference_batch} cells; query: "
          f"{settings['query_cells']} cells of the other batch")
    print("| method | reference s | query s | query macro-F1 | reference movement (median) | moved less than NN |")
    print("|---|---|---|---|---|---|")
    for name in ("exceiver", "scvi_scarches"):
        r = results[name]
        print(f"| {name} | {r['reference_seconds']:.0f} | {r['query_seconds']:.0f} | {r['macro_f1']:.3f} | "
              f"{r['median_movement']:.3f} | {r['share_moved_less']:.3f} |")


if __name__ == "__main__":
    main()
