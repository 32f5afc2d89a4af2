"""The command line's options: one argparse parser for every command. Building it imports
nothing heavy (no torch, no anndata), so `exceiver --help` and option errors answer at once."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from exceiver.train.config import TrainingConfig
from exceiver.version import __version__

# Options that map onto TrainingConfig fields; unset ones keep TrainingConfig's defaults.
TRAINING_OPTIONS = ("max_epochs", "max_minutes", "batch_size", "learning_rate", "seed", "val_fraction",
                    "num_workers", "accelerator", "devices", "num_nodes", "strategy", "precision")


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def data_options(args: argparse.Namespace) -> dict:
    """Where the counts are: --gene-key, --layer, --allow-non-integer as keyword arguments."""
    return {"gene_key": args.gene_key, "layer": args.layer, "allow_non_integer": args.allow_non_integer}


def training_options(args: argparse.Namespace) -> dict:
    """The training options given on the command line (unset ones keep TrainingConfig's defaults)."""
    return {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}


def run_options(args: argparse.Namespace) -> dict:
    """How a training run guards against interruption: resume, checkpoint interval, keep."""
    return {"resume": args.resume, "checkpoint_minutes": args.checkpoint_minutes,
            "keep_checkpoints": args.keep_checkpoints}


VALUE_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a text"}


def model_option(text: str) -> tuple[str, int | float | bool | str]:
    """FIELD=VALUE for a settable field of the preset's configs; the value's type is the field's."""
    from exceiver.nn.config import settable_fields

    field, sep, value = text.partition("=")
    kinds = {k: v for k, v in settable_fields().items() if k != "paper_compatible"}  # import-original's alone
    if not sep or field not in kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: expected FIELD=VALUE with FIELD one of {sorted(kinds)}")
    if kinds[field] is bool and value.lower() in ("true", "false", "1", "0"):
        return field, value.lower() in ("true", "1")
    with contextlib.suppress(ValueError):
        if kinds[field] is not bool:
            return field, kinds[field](value)
    raise argparse.ArgumentTypeError(f"{text!r}: {field} needs {VALUE_KINDS[kinds[field]]}")


def _default(field: str) -> str:
    return f"(default: {getattr(TrainingConfig, field)})"


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gene-key", metavar="COL", help="var column holding gene identifiers (default: var_names)")
    p.add_argument("--layer", help="layer holding raw counts, or raw for adata.raw (default: X)")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept counts that are mostly not integers (refused otherwise: normalised data is not counts)")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-epochs", type=int, help=_default("max_epochs"))
    p.add_argument("--max-minutes", type=float, help="time budget; the learning-rate schedule follows it (default: none)")
    p.add_argument("--batch-size", type=int, help=_default("batch_size"))
    p.add_argument("--learning-rate", type=float, help=_default("learning_rate"))
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--val-fraction", type=float, help=_default("val_fraction"))
    p.add_argument("--num-workers", type=int, help="data-loader worker processes " + _default("num_workers"))
    p.add_argument("--accelerator", help="Lightning accelerator: auto, cpu, gpu, ... " + _default("accelerator"))
    p.add_argument("--devices", type=_devices, help="Lightning devices: auto, N, ... " + _default("devices"))
    p.add_argument("--num-nodes", type=int, help="machines, for multi-node DDP (SLURM, torchrun) " + _default("num_nodes"))
    p.add_argument("--strategy", help="Lightning strategy: auto, ddp, ... " + _default("strategy"))
    p.add_argument("--precision", help="Lightning precision: 32-true, bf16-mixed, ... " + _default("precision"))
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --out (same data and settings) from its checkpoint")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0, metavar="M",
                   help="save a resumable checkpoint every M minutes of training; SIGTERM and Ctrl+C save one "
                        "too (default: 10)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the last checkpoint in OUT/checkpoints/ (a pickle; by default the finished folder "
                        "holds only safetensors, JSON and text)")


MODEL_HELP = "a model folder, or the name of a model shipped with exceiver (human-mouse-small)"


def _add_inference_options(p: argparse.ArgumentParser, *, model: str = "MODEL_DIR", out: str = "OUT.h5ad") -> None:
    p.add_argument("model", type=Path, metavar=model, **({"help": MODEL_HELP} if model == "MODEL_DIR" else {}))
    p.add_argument("data", type=Path, metavar="DATA.h5ad")
    p.add_argument("--out", required=True, type=Path, metavar=out)
    _add_data_options(p)
    p.add_argument("--batch-size", type=int, help="cells per batch (default: 16 on CPU, 256 on GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exceiver", description="Exceiver: a single-cell gene expression language model.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"exceiver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("pretrain", help="pretrain a model on raw counts (.h5ad)",
                            description="Pretrain an Exceiver by masked-expression prediction on "
                                        "one or more .h5ad files of raw counts.")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA.h5ad",
                   help=".h5ad files, or one corpus folder from build-corpus (streamed from disk)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--preset", default="default", choices=["default", "paper"])
    p.add_argument("--genes", type=Path, metavar="FILE", help="restrict the vocabulary to these genes (one per line)")
    p.add_argument("--n-top-genes", type=int, metavar="N",
                   help="vocabulary: the N most variable genes of the training cells, 0 for all "
                        "(default: the preset's, 2000 for default, all for paper)")
    p.add_argument("--init", type=Path, metavar="MODEL_DIR",
                   help="continue training this pretrained model (a folder, or a shipped model's name such as "
                        "human-mouse-small) on DATA (its vocabulary, normalisation, architecture and objectives)")
    p.add_argument("--own-genes", action="store_true",
                   help="with --init: the vocabulary is DATA's own (--n-top-genes, as a fresh model's); genes the "
                        "model knows (by name or through its gene map / --gene-map) start from its weights")
    p.add_argument("--extend-genes", action="store_true",
                   help="with --init: add DATA's genes outside the model's vocabulary (at most --n-top-genes, "
                        "the most variable) with fresh embeddings")
    p.add_argument("--batch-key", metavar="COL",
                   help="obs column of batches (assay, donor, ...): a learned batch embedding conditions the "
                        "count decoder, so the cell embedding need not carry the batch")
    p.add_argument("--gene-map", type=Path, metavar="FILE",
                   help="translate datasets whose genes are the map's dataset genes: CSV of model gene, dataset "
                        "gene (e.g. human,mouse orthologs); other datasets are read as they are")
    p.add_argument("--set", dest="model_options", action="append", default=[], type=model_option, metavar="FIELD=VALUE",
                   help="override a field of the preset (architecture, tokenizer or objective), e.g. "
                        "--set n_latents=64 --set contrastive_weight=0 (repeat for several)")
    _add_data_options(p)
    _add_training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")

    p = commands.add_parser("embed", help="write cell embeddings to obsm",
                            description="Embed the cells of DATA.h5ad with a pretrained model and "
                                        "write the AnnData, with the embedding in obsm, to OUT.h5ad.")
    p.add_argument("--key", default="X_exceiver", help="obsm key of the embedding (default: X_exceiver)")
    p.add_argument("--pooling", choices=["bottleneck", "mean", "flatten"],
                   help="the cell bottleneck, the mean of the latents, or all latents flattened (the original's) "
                        "(default: the bottleneck where the model has one, else the mean)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader processes reading cells (default: 0)")
    p.add_argument("--gene-map", type=Path, metavar="FILE",
                   help="translate the dataset's genes first: CSV of model gene, dataset gene (e.g. human,mouse)")
    _add_inference_options(p)

    p = commands.add_parser("build-corpus", help="convert .h5ad files into an on-disk corpus for pretraining",
                            description="Align .h5ad files of raw counts to one gene vocabulary and write them, "
                                        "chunk by chunk, as a sharded on-disk corpus that `exceiver pretrain "
                                        "CORPUS_DIR` streams with memory that does not grow with the cells.")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA.h5ad")
    p.add_argument("--out", required=True, type=Path, metavar="CORPUS_DIR", help="corpus folder to write")
    p.add_argument("--genes", type=Path, metavar="FILE", help="restrict the vocabulary to these genes (one per line)")
    p.add_argument("--shard-cells", type=int, default=65_536, help="cells per shard file (default: 65536)")
    _add_data_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CORPUS_DIR")

    p = commands.add_parser("finetune", help="train a cell classifier from a pretrained model",
                            description="Fine-tune a pretrained model to predict a label column of obs "
                                        "(class-token query; cross-entropy + masked-expression MSE), or fit a "
                                        "linear probe of its cell embedding (--freeze).")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help=MODEL_HELP)
    p.add_argument("data", type=Path, metavar="DATA.h5ad")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the labels")
    p.add_argument("--out", required=True, type=Path, metavar="CLF_DIR", help="classifier folder to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--freeze", action="store_true",
                      help="linear probe: logistic regression on the frozen cell embedding, fitted in closed form "
                           "(of the training options only --seed and --val-fraction apply)")
    mode.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (a control)")
    p.add_argument("--expression-weight", type=float, default=1.0,
                   help="weight of the masked-expression MSE beside cross-entropy (default: 1.0; 0: off)")
    p.add_argument("--pretrained-lr-mult", type=float, metavar="M",
                   help="learning rate of the pretrained weights, as a fraction of the new class head's (default: 0.1)")
    _add_data_options(p)
    _add_training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CLF_DIR")

    p = commands.add_parser("predict", help="predict labels of cells with a fine-tuned classifier",
                            description="Write DATA.h5ad with obs['exceiver_prediction'], "
                                        "obsm['exceiver_probabilities'] and uns['exceiver_classes'] to OUT.h5ad.")
    _add_inference_options(p, model="CLF_DIR")

    p = commands.add_parser("annotate", help="transfer labels from a labelled reference to query cells",
                            description="Embed REFERENCE.h5ad and QUERY.h5ad with a pretrained model and carry the "
                                        "reference's labels to the query through the embedding. Writes QUERY.h5ad "
                                        "with obs['exceiver_label'] ('unknown' below --min-confidence), "
                                        "obs['exceiver_label_confidence'] and uns['exceiver_annotate'] to OUT.h5ad.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help=MODEL_HELP)
    p.add_argument("reference", type=Path, metavar="REFERENCE.h5ad")
    p.add_argument("query", type=Path, metavar="QUERY.h5ad")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column of the reference with the labels")
    p.add_argument("--out", required=True, type=Path, metavar="OUT.h5ad")
    p.add_argument("--method", choices=["linear", "knn"],
                   help="logistic regression on the embedding, or distance-weighted kNN in it (default: linear)")
    p.add_argument("--n-neighbors", type=int, metavar="K", help="neighbours of --method knn (default: 15)")
    p.add_argument("--min-confidence", type=float, metavar="P",
                   help="label cells whose chosen label has a lower probability 'unknown' (default: 0.5)")
    p.add_argument("--key", default="exceiver_label", help="obs column to write (default: exceiver_label)")
    _add_data_options(p)
    p.add_argument("--batch-size", type=int, help="cells per batch (default: 16 on CPU, 256 on GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.h5ad")

    p = commands.add_parser("impute", help="write predicted expression of every gene to a layer",
                            description="Predict each cell's log-normalised expression of every gene of DATA.h5ad "
                                        "from its observed genes and write the AnnData, with "
                                        "layers['exceiver_imputed'], to OUT.h5ad.")
    p.add_argument("--key", default="exceiver_imputed", help="layer to write (default: exceiver_imputed)")
    _add_inference_options(p)

    p = commands.add_parser("perturb", help="predict the effects of knocking out or overexpressing genes",
                            description="In-silico perturbation: remove a gene's token (knockout) or set its value "
                                        "(overexpress: a high quantile of its expression; or a log-normalised "
                                        "level), re-run the model, and write each gene's predicted change to a CSV.")
    p.add_argument("--gene", required=True, action="append", metavar="G",
                   help="gene to perturb (repeat for several, each perturbed on its own)")
    p.add_argument("--mode", default="knockout", metavar="M",
                   help="knockout, overexpress, or a log-normalised expression level (default: knockout)")
    p.add_argument("--groupby", metavar="COL", help="obs column: effects per group of cells")
    p.add_argument("--group", action="append", metavar="VALUE", help="only this group of --groupby (repeatable)")
    p.add_argument("--quantile", type=float, default=0.95,
                   help="overexpress to this quantile of the gene's expression in expressing cells (default: 0.95)")
    _add_inference_options(p, out="EFFECTS.csv")

    p = commands.add_parser("evaluate", help="judge a model's reconstruction and embeddings against baselines",
                            description="Evaluate a model on DATA.h5ad: masked-expression reconstruction vs "
                                        "gene-mean and kNN baselines; cell embeddings vs label columns (kNN, "
                                        "Leiden ARI/NMI, silhouette, similarity profile) and batches beside PCA "
                                        "baselines; gene embeddings vs annotation sources. Writes metrics.json, "
                                        "report.md and PNG figures to REPORT_DIR.")
    p.add_argument("model", type=Path, metavar="MODEL_DIR", help=MODEL_HELP)
    p.add_argument("data", type=Path, metavar="DATA.h5ad")
    p.add_argument("--out", required=True, type=Path, metavar="REPORT_DIR")
    p.add_argument("--label-key", action="append", default=[], metavar="COL",
                   help="obs column of cell annotations (repeat for several)")
    p.add_argument("--batch-key", metavar="COL", help="obs column of batches, for batch-mixing scores")
    p.add_argument("--annotations", type=Path, metavar="FILE",
                   help="gene annotations: a TSV with gene_symbol, annotation_id, source (gzip allowed) or a GMT file")
    p.add_argument("--source", action="append", metavar="NAME",
                   help="annotation source to score (repeat; default: every source in the file)")
    p.add_argument("--pooling", choices=["bottleneck", "mean", "flatten"],
                   help="cell embedding: the cell bottleneck, the mean of the latents or all latents flattened "
                        "(default: the bottleneck where the model has one, else the mean)")
    p.add_argument("--max-cells", type=int, default=10000, help="evaluate a seeded sample of at most N cells")
    p.add_argument("--seed", type=int, default=0)
    _add_data_options(p)
    p.add_argument("--gene-map", type=Path, metavar="FILE",
                   help="translate the dataset's genes first: CSV of model gene, dataset gene (e.g. human,mouse)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--overwrite", action="store_true", help="replace an existing REPORT_DIR")

    p = commands.add_parser("demo", help="the shipped model on bundled PBMC data (no downloads)",
                            description="The shipped model on 700 PBMCs bundled with scanpy: zero-shot, continued, "
                                        "beside a model trained from scratch and PCA; label transfer; UMAPs and a report.")
    p.add_argument("--out", type=Path, default=Path("exceiver_demo"), metavar="DIR")
    p.add_argument("--max-minutes", type=float, default=1.0,
                   help="training minutes of the continued model, and of the model trained from scratch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace DIR even if it is not an earlier demo's output")

    p = commands.add_parser("import-original", help="import a checkpoint of the original release",
                            description="Convert a PyTorch Lightning checkpoint of the original Exceiver code "
                                        "into a model folder that computes exactly as the original "
                                        "(paper-compatible mode). Nothing in the file is executed.")
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--genes", type=Path, metavar="FILE",
                   help="the checkpoint's genes, one per line, in its order (default: placeholder names)")
    p.add_argument("--scaler", type=Path, metavar="SCALER.npz",
                   help="the original StandardScaler: an .npz with 'mean' and 'scale' arrays, one value per gene")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")
    return parser
