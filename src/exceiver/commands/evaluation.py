"""The commands that judge models: `evaluate` (a report against baselines) and `demo` (the shipped
model on bundled data); each command's options beside its settings and handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from exceiver.commands.defaults import add, add_command, given, of_function
from exceiver.commands.inference import DEFAULT_POOLING, POOLINGS
from exceiver.commands.options import add_inference_options, data_options
from exceiver.outputs import claim

EVALUATE = "exceiver.evaluate.report:evaluate"
DEMO = "exceiver.demo:run_demo"


def add_evaluate(commands) -> None:
    p = add_command(commands, "evaluate", run_evaluate, evaluate_settings,
                    help="judge a model's reconstruction and embeddings against baselines")
    p.add_argument("--label-key", action="append", default=[], metavar="COL",
                   help="obs column of cell annotations (repeat for several)")
    p.add_argument("--batch-key", metavar="COL",
                   help="obs column of batches, for batch-mixing scores (and, with --label-key and "
                        "scib-metrics installed, its bio-conservation, batch-correction and total scores)")
    p.add_argument("--annotations", type=Path, metavar="FILE",
                   help="gene annotations: a TSV with gene_symbol, annotation_id, source (gzip allowed) or a GMT file")
    add(p, "--source", action="append", metavar="NAME", help="annotation source to score (repeat for several)",
        shown=of_function(EVALUATE, "sources", none="every source in the file"))
    add(p, "--pooling", choices=POOLINGS, shown=of_function(EVALUATE, "pooling", none=DEFAULT_POOLING),
        help="cell embedding: the cell bottleneck, the mean of the latents or all latents flattened")
    add(p, "--max-cells", type=int, metavar="N", help="evaluate a seeded sample of at most N cells",
        shown=of_function(EVALUATE, "max_cells"))
    add(p, "--seed", type=int, help="seed of the sample of cells", shown=of_function(EVALUATE, "seed"))
    add_inference_options(p, out="REPORT_DIR", batches=False)


def evaluate_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `evaluate` (options not given keep its defaults)."""
    return {"label_keys": args.label_key, "batch_key": args.batch_key, "annotations": args.annotations,
            "sources": args.source, "pooling": args.pooling, "device": args.device, "overwrite": args.overwrite,
            **given(args, max_cells="max_cells", seed="seed"), **data_options(args)}


def run_evaluate(args: argparse.Namespace) -> None:
    """Evaluate a model on DATA.h5ad: masked-expression reconstruction vs gene-mean and kNN
    baselines; cell embeddings vs label columns (kNN, Leiden ARI/NMI, silhouette, similarity
    profile) and batches beside PCA baselines; gene embeddings vs annotation sources. Writes
    metrics.json, report.md and PNG figures to REPORT_DIR."""
    from exceiver.evaluate.report import best_pca, evaluate
    from exceiver.model import Exceiver

    with claim(args.out, overwrite=args.overwrite, folder=True):  # refused now, not after the work
        metrics = evaluate(Exceiver.load(args.model), args.data, args.out, progress=not args.quiet,
                           **evaluate_settings(args))
    rec = metrics["reconstruction"]["model"]
    summary = [f"masked MSE {rec['mse']:.4f} ({rec['mse_ratio']:.3f} x gene mean)"]
    for key, cell in metrics["cells"].items():
        reps = cell["representations"]
        best = best_pca(reps)
        summary.append(f"{key}: kNN macro-F1 {reps['exceiver']['knn_macro_f1']:.3f} vs {best} "
                       f"{reps[best]['knn_macro_f1']:.3f}")
    print(f"wrote {args.out}/report.md: " + "; ".join(summary))


def add_demo(commands) -> None:
    p = add_command(commands, "demo", run_demo, demo_settings,
                    help="the shipped model on bundled PBMC data (no downloads)")
    add(p, "--out", type=Path, metavar="DIR", help="folder to write", shown=of_function(DEMO, "out"))
    add(p, "--max-minutes", type=float, metavar="M", shown=of_function(DEMO, "max_minutes"),
        help="training minutes of the continued model, and of the model trained from scratch")
    add(p, "--seed", type=int, help="seed of the split and the training", shown=of_function(DEMO, "seed"))
    p.add_argument("--overwrite", action="store_true", help="replace DIR even if it is not an earlier demo's output")


def demo_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `run_demo` (options not given keep its defaults)."""
    return {"overwrite": args.overwrite, **given(args, out="out", max_minutes="max_minutes", seed="seed")}


def run_demo(args: argparse.Namespace) -> None:
    """The shipped model on 700 PBMCs bundled with scanpy: zero-shot, continued, beside a model
    trained from scratch and PCA; label transfer; UMAPs and a report."""
    from exceiver.demo import run_demo as demo

    print(demo(progress=not args.quiet, **demo_settings(args)))
