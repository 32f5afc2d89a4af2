"""Learning per CPU-minute: scVI and exceiver on the same file, for the same wall time, with the
same threads, in the same run; PCA beside them (`pca_hvg2000_seurat_scaled_50`: scanpy's tutorial
recipe, 50 components of the 2,000 HVGs scaled to unit variance; see common.py).

For each target, scVI (scvi-tools, its tutorial recipe: raw counts of the 2,000 seurat_v3 highly
variable genes, the default model, the default number of epochs) trains first and its training
time is measured; exceiver's `pretrain` (the `default` preset) then gets that same time as its
budget (`max_minutes`). A target with a fixed budget (`pbmc3k_10min`) gives both that budget.
Each embedding is judged with `exceiver.evaluate`'s metrics: kNN macro-F1 of cell type (k=15,
5-fold), Leiden ARI, and depth R^2 (how much of the embedding is sequencing depth); and each
run's training cells/s and steps. exceiver's masked-value MSE is reported against the gene-mean
baseline (ratio < 1: better than each gene's mean).

    pip install -c benchmarks/constraints.txt -e ".[bench]"
    EXCEIVER_SHARED=../shared python benchmarks/efficiency.py --out efficiency --targets zeisel joost
    python benchmarks/efficiency.py --out efficiency --table     # the table of what is done

Results go to OUT/<target>/baselines.json (PCA and scVI, run once) and OUT/<target>/<variant>.json
(an exceiver run: `--variant NAME --set FIELD=VALUE ...` for ablations against the same scVI run);
a rerun skips what is done, and the table is printed with exceiver/scVI ratios. `--init MODEL_DIR`
(with `--gene-map` for mouse targets of a human model) continues a pretrained model on each target
instead of training from scratch, for the same budget: what pretraining buys per CPU-minute
(`--zero-shot`: its embedding as it is; `--init` takes a shipped model's name too). Run one target per core (`--threads 1`, two processes on
two cores) or one at a time with all threads: never more heavy jobs than cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from common import (TARGETS as SHARED_TARGETS, add_model_overrides_option, add_targets_option, add_threads_option,
                    benchmark_parser, pca_hvg2000_seurat_scaled_50, pca_legend, quiet, read_result, scvi_baseline,
                    shared_folder, threads, write_result)
from exceiver import Exceiver, TrainingConfig, pretrain
from exceiver.evaluate.cells import depth_r2, knn_cross_validated, leiden_clusters

TARGETS = {name: SHARED_TARGETS[name] for name in ("zeisel", "pbmc3k", "cellbench", "joost")}
TARGETS["pbmc3k_10min"] = SHARED_TARGETS["pbmc3k"]
# A target with a fixed budget in minutes for both; the others: scVI's default training, timed.
FIXED_MINUTES = {"pbmc3k_10min": 10.0}
PCA_RECIPE = "pca_hvg2000_seurat_scaled_50"  # the PCA baseline of this benchmark (and batch_mixing's)


def scores(embedding: np.ndarray, labels: np.ndarray, log_depth: np.ndarray) -> dict:
    clusters = leiden_clusters(embedding)
    return {**knn_cross_validated(embedding, labels), "leiden_ari": float(adjusted_rand_score(labels, clusters)),
            "depth_r2": depth_r2(embedding, log_depth)}


def scvi_run(adata: ad.AnnData, minutes: float | None) -> dict:
    model, seconds = scvi_baseline(adata, minutes=minutes)
    trainer = model.trainer
    n_train = int(round(model.adata.n_obs * 0.9))  # scVI's default train_size
    epochs = int(trainer.current_epoch)
    return {"seconds": seconds, "steps": int(trainer.global_step), "epochs": epochs,
            "cells_per_s": epochs * n_train / seconds, "embedding": model.get_latent_representation()}


def exceiver_run(adata: ad.AnnData, minutes: float, model: dict, training: dict, warm: dict) -> dict:
    """`warm`: continued training of a pretrained model (`init`, `gene_map`, `extend_genes`)."""
    start = time.perf_counter()
    fitted = pretrain(adata, None, model=model, max_minutes=minutes, max_epochs=100_000, patience=100_000,
                      progress=False, **warm, **training)
    seconds = time.perf_counter() - start
    metrics = fitted.metrics
    # a model of the target's own genes reads it as it is
    reading = {"gene_map": None if warm.get("own_genes") else warm.get("gene_map"), "gene_key": warm.get("gene_key")}
    embedding = fitted.embed(adata, inplace=False, progress=False, **reading)
    others = {pooling: fitted.embed(adata, inplace=False, pooling=pooling, progress=False, **reading)
              for pooling in ("mean", "flatten")}
    return {"other_poolings": others, "seconds": seconds, "steps": metrics["steps"], "epochs": metrics["epochs"],
            "cells_per_s": metrics["steps"] * fitted.training["batch_size"] / metrics["seconds"],
            "val_mse_ratio": metrics["val_mse_ratio"], "val_masked_mse": metrics["val_masked_mse"],
            "val_gene_mean_mse": metrics["val_gene_mean_mse"], "model": model, "training": training,
            "warm_start": {k: str(v) for k, v in warm.items()}, "n_genes": metrics["n_genes"], "embedding": embedding}


def zero_shot_run(adata: ad.AnnData, warm: dict) -> dict:
    """The pretrained model of `warm["init"]` (a folder or a shipped model's name) as it is: no
    training on the target, only its embedding (the time is the embedding's)."""
    start = time.perf_counter()
    fitted = Exceiver.load(warm["init"])
    reading = {"gene_map": warm.get("gene_map"), "gene_key": warm.get("gene_key")}
    embedding = fitted.embed(adata, inplace=False, progress=False, **reading)
    others = {pooling: fitted.embed(adata, inplace=False, pooling=pooling, progress=False, **reading)
              for pooling in ("mean", "flatten")}
    return {"other_poolings": others, "seconds": time.perf_counter() - start, "steps": 0, "epochs": 0,
            "val_mse_ratio": fitted.metrics.get("val_mse_ratio"), "n_genes": len(fitted.vocab),
            "warm_start": {k: str(v) for k, v in warm.items()}, "zero_shot": True, "embedding": embedding}


def run_target(name: str, data: Path, out: Path, n_threads: int | None, variant: str, model: dict,
               training: dict, minutes: float | None, warm: dict, zero_shot: bool = False) -> None:
    """PCA and scVI once per target (OUT/<target>/baselines.json), then exceiver's `variant` with
    the `model` overrides for scVI's time or `minutes` (OUT/<target>/<variant>.json)."""
    target, fixed = TARGETS[name], FIXED_MINUTES.get(name)
    adata = target.read(data)
    labels = target.labels(adata)
    log_depth = np.log1p(np.asarray(adata.X.sum(1)).ravel())
    folder = out / name
    folder.mkdir(exist_ok=True)
    baselines = folder / "baselines.json"
    if not baselines.exists():
        result = {"target": name, "file": target.file, "n_cells": adata.n_obs, "n_types": len(set(labels)),
                  "threads": n_threads or torch.get_num_threads(), "torch": torch.__version__}
        start = time.perf_counter()
        x = pca_hvg2000_seurat_scaled_50(adata)
        result["pca"] = {"recipe": PCA_RECIPE, "seconds": time.perf_counter() - start, **scores(x, labels, log_depth)}
        threads(n_threads)  # scanpy's numerical libraries reset torch's thread count
        run = scvi_run(adata, fixed)
        embedding = run.pop("embedding")
        result["scvi"] = {**run, **scores(embedding, labels, log_depth)}
        result["budget_minutes"] = fixed or run["seconds"] / 60
        write_result(result, baselines)
    budget = minutes or read_result(baselines, {})["budget_minutes"]
    threads(n_threads)
    if warm and target.gene_key:
        warm = {**warm, "gene_key": target.gene_key}  # a pretrained model knows genes by symbol
    run = zero_shot_run(adata, warm) if zero_shot else exceiver_run(adata, budget, model, training, warm)
    embedding = run.pop("embedding")
    run["other_poolings"] = {pooling: knn_cross_validated(x, labels)["knn_macro_f1"]
                             for pooling, x in run["other_poolings"].items()}  # kNN macro-F1 of the other readouts
    write_result({"budget_minutes": budget, **run, **scores(embedding, labels, log_depth)}, folder / f"{variant}.json")


def table(out: Path) -> None:
    """Every finished run, the PCA row named by its recipe (baselines written before results
    recorded their recipe were this benchmark's one recipe too)."""
    print(f"{'target':<14}{'budget':>8}  {'method':<30}{'kNN F1':>8}{'ARI':>7}{'depth R2':>9}{'cells/s':>9}"
          f"{'steps':>7}  notes")
    recipes = set()
    for baselines in sorted(out.glob("*/baselines.json")):
        r = read_result(baselines, {})
        recipe = r["pca"].get("recipe", PCA_RECIPE)
        recipes.add(recipe)
        rows = [(recipe, r["pca"], None), ("scvi", r["scvi"], r["budget_minutes"])]
        rows += [(p.stem, read_result(p, {}), None) for p in sorted(baselines.parent.glob("*.json"))
                 if p.name != "baselines.json"]
        for i, (method, m, budget) in enumerate(rows):
            note = ""
            if "val_mse_ratio" in m:
                budget = m["budget_minutes"]
                note = (f"kNN {m['knn_macro_f1'] / r['scvi']['knn_macro_f1']:.2f}x scVI; masked MSE "
                        f"{m['val_mse_ratio']:.2f}x gene mean")
                note += "".join(f"; {k} {v:.3f}" for k, v in m.get("other_poolings", {}).items())
            rate = f"{m['cells_per_s']:9.0f}" if "cells_per_s" in m else " " * 9
            steps = f"{m['steps']:7d}" if "steps" in m else " " * 7
            when = f"{budget:.1f}m" if budget else ""
            print(f"{r['target'] if i == 0 else '':<14}{when:>8}  {method:<30}{m['knn_macro_f1']:8.3f}"
                  f"{m['leiden_ari']:7.3f}{m['depth_r2']:9.3f}{rate}{steps}  {note}")
    if recipes:
        print(pca_legend(sorted(recipes)))


def training_option(text: str) -> tuple[str, float]:
    """FIELD=VALUE of a numeric TrainingConfig field."""
    field, _, value = text.partition("=")
    if field not in {f.name for f in dataclasses.fields(TrainingConfig)}:
        raise argparse.ArgumentTypeError(f"{field!r} is not a TrainingConfig field")
    number = float(value)
    return field, int(number) if number.is_integer() and "." not in value and "e" not in value else number


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    add_targets_option(parser, TARGETS)
    add_threads_option(parser)
    parser.add_argument("--variant", default="exceiver", help="name of this exceiver run (default: exceiver)")
    add_model_overrides_option(parser, "FIELD=VALUE override of the default preset for this variant (repeatable)")
    parser.add_argument("--train", action="append", default=[], type=training_option,
                        help="FIELD=VALUE of TrainingConfig for this variant, e.g. learning_rate=4e-3 (repeatable)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="exceiver's budget instead of scVI's time (ablations; say so when reporting)")
    parser.add_argument("--init", type=Path, help="continue this pretrained model on each target (`pretrain --init`)")
    parser.add_argument("--gene-map", type=Path, help="with --init: translate targets of the map's dataset genes "
                                                      "(e.g. human,mouse orthologs for mouse targets)")
    parser.add_argument("--extend-genes", action="store_true", help="with --init: add the target's genes")
    parser.add_argument("--own-genes", action="store_true",
                        help="with --init: the target's own vocabulary, rows of known genes from the model")
    parser.add_argument("--zero-shot", action="store_true",
                        help="with --init: the pretrained model's embedding as it is, no training on the target")
    parser.add_argument("--table", action="store_true", help="print the table of finished runs only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        data = shared_folder() / "data"
        quiet()
        for name in args.targets:
            if not (args.out / name / f"{args.variant}.json").exists():
                warm = {"init": args.init, "gene_map": args.gene_map, "extend_genes": args.extend_genes,
                        **({"own_genes": True} if args.own_genes else {})} \
                    if args.init else {}
                run_target(name, data, args.out, args.threads, args.variant, dict(args.model),
                           dict(args.train), args.minutes, warm, zero_shot=args.zero_shot)
    table(args.out)


if __name__ == "__main__":
    main()
