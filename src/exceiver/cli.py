"""The `exceiver` command line: pretrain, embed, finetune, predict, evaluate, impute, perturb, demo,
import-original, build-corpus."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from exceiver.errors import ExceiverInputError, ModelFileError, TrainingError, speaking
from exceiver.devices import inference_device
from exceiver.train.config import TrainingConfig

FILE_OUTPUTS = ("embed", "predict", "impute", "perturb")  # commands whose --out is a file
FOLDER_OUTPUTS = ("pretrain", "build-corpus", "finetune", "evaluate", "import-original")
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


def _add_inference_options(p: argparse.ArgumentParser, *, model: str = "MODEL_DIR", out: str = "OUT.h5ad") -> None:
    p.add_argument("model", type=Path, metavar=model)
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
                                        "(class-token query; cross-entropy + masked-expression MSE).")
    p.add_argument("model", type=Path, metavar="MODEL_DIR")
    p.add_argument("data", type=Path, metavar="DATA.h5ad")
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the labels")
    p.add_argument("--out", required=True, type=Path, metavar="CLF_DIR", help="classifier folder to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--freeze", action="store_true",
                      help="probe: keep the pretrained encoder frozen, train only the class read-out")
    mode.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (a control)")
    p.add_argument("--expression-weight", type=float, default=1.0,
                   help="weight of the masked-expression MSE beside cross-entropy (default: 1.0; 0: off)")
    _add_data_options(p)
    _add_training_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CLF_DIR")

    p = commands.add_parser("predict", help="predict labels of cells with a fine-tuned classifier",
                            description="Write DATA.h5ad with obs['exceiver_prediction'], "
                                        "obsm['exceiver_probabilities'] and uns['exceiver_classes'] to OUT.h5ad.")
    _add_inference_options(p, model="CLF_DIR")

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
    p.add_argument("model", type=Path, metavar="MODEL_DIR")
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

    p = commands.add_parser("demo", help="pretrain and embed on bundled PBMC data (no downloads)",
                            description="Pretrain a small model on 700 PBMCs bundled with scanpy, "
                                        "embed them, and write a UMAP and a report.")
    p.add_argument("--out", type=Path, default=Path("exceiver_demo"), metavar="DIR")
    p.add_argument("--max-minutes", type=float, default=3.0)
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


def run_pretrain(args: argparse.Namespace) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.pretrain import pretrain

    model = pretrain(args.data, args.out, preset=args.preset, model=dict(args.model_options), genes=args.genes,
                     n_top_genes=args.n_top_genes, overwrite=args.overwrite, progress=not args.quiet,
                     **data_options(args), **training_options(args))
    if rank_zero_only.rank == 0:  # distributed runs execute this in every process
        print(f"wrote {args.out}: {model}")


def run_embed(args: argparse.Namespace) -> None:
    import h5py

    from exceiver.model import Exceiver

    model = Exceiver.load(args.model)
    model.embed_file(args.data, args.out, key_added=args.key, pooling=args.pooling, batch_size=args.batch_size,
                     device=args.device, num_workers=args.num_workers, overwrite=args.overwrite,
                     progress=not args.quiet, **data_options(args))
    with h5py.File(args.out, "r") as written:
        n_cells, width = written["obsm"][args.key].shape
    print(f"wrote {args.out}: obsm[{args.key!r}] of {n_cells:,} cells x {width}")


def run_build_corpus(args: argparse.Namespace) -> None:
    from exceiver.data.corpus import build_corpus

    corpus = build_corpus(args.data, args.out, genes=args.genes, shard_cells=args.shard_cells,
                          overwrite=args.overwrite, progress=not args.quiet, **data_options(args))
    print(f"wrote {args.out}: {corpus.n_cells:,} cells, {len(corpus.vocab):,} genes, {len(corpus.shards)} shard(s)")


def run_finetune(args: argparse.Namespace) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.finetune import finetune

    mode = "freeze" if args.freeze else "scratch" if args.from_scratch else "full"
    model = finetune(args.model, args.data, args.label_key, args.out, mode=mode,
                     expression_loss_weight=args.expression_weight, overwrite=args.overwrite, progress=not args.quiet,
                     **data_options(args), **training_options(args))
    if rank_zero_only.rank == 0:
        m = model.metrics
        print(f"wrote {args.out}: {len(model.classes)} classes, validation accuracy {m['val_accuracy']:.3f}, "
              f"macro-F1 {m['val_macro_f1']:.3f} ({mode})")


def run_predict(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver

    model = Exceiver.load(args.model)
    if not model.classes:
        raise ExceiverInputError(f"{args.model} is not a classifier (no classes); fine-tune it first")
    [(name, adata)] = read_datasets(args.data)
    prediction = model.predict(adata, batch_size=args.batch_size, device=args.device, name=name,
                               progress=not args.quiet, **data_options(args))
    write_h5ad(adata, args.out, overwrite=args.overwrite)
    counts = prediction.value_counts()
    print(f"wrote {args.out}: {adata.n_obs:,} cells predicted; most frequent: "
          + ", ".join(f"{k} ({v})" for k, v in counts.head(3).items()))


def run_impute(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_h5ad
    from exceiver.model import Exceiver
    from exceiver.tl import impute

    model = Exceiver.load(args.model)
    [(name, adata)] = read_datasets(args.data)
    impute(model, adata, key_added=args.key, batch_size=args.batch_size, device=args.device, name=name,
           progress=not args.quiet, **data_options(args))
    write_h5ad(adata, args.out, overwrite=args.overwrite)
    n_genes = adata.uns["exceiver"][args.key]["n_imputed_genes"]
    print(f"wrote {args.out}: layers[{args.key!r}] of {adata.n_obs:,} cells x {n_genes:,} imputed genes")


def run_perturb(args: argparse.Namespace) -> None:
    from exceiver.data.sources import read_datasets
    from exceiver.io import write_csv
    from exceiver.model import Exceiver
    from exceiver.tl import perturb

    model = Exceiver.load(args.model)
    [(name, adata)] = read_datasets(args.data)
    effects = perturb(model, adata, args.gene, args.mode, groupby=args.groupby, groups=args.group,
                      quantile=args.quantile, batch_size=args.batch_size, device=args.device, name=name,
                      progress=not args.quiet, **data_options(args))
    write_csv(effects, args.out, overwrite=args.overwrite)
    top = effects.loc[effects["gene"] != effects["perturbed_gene"]].head(3)
    print(f"wrote {args.out}: {len(effects):,} rows; strongest: "
          + ", ".join(f"{g} {s:+.3f}" for g, s in zip(top["gene"], top["mean_shift"])))


def run_evaluate(args: argparse.Namespace) -> None:
    from exceiver.data.genemap import map_genes
    from exceiver.data.sources import read_datasets
    from exceiver.evaluate.report import best_pca, evaluate

    [(name, adata)] = read_datasets(args.data)
    gene_key = args.gene_key
    if args.gene_map:
        adata, gene_key = map_genes(adata, args.gene_map, gene_key=gene_key, layer=args.layer, name=name), None
    metrics = evaluate(args.model, adata, args.out, label_keys=args.label_key, batch_key=args.batch_key,
                       gene_key=gene_key, layer=None if args.gene_map else args.layer, annotations=args.annotations,
                       sources=args.source, pooling=args.pooling, max_cells=args.max_cells, device=args.device,
                       seed=args.seed, allow_non_integer=args.allow_non_integer, overwrite=args.overwrite,
                       progress=not args.quiet, name=name)
    rec = metrics["reconstruction"]["model"]
    summary = [f"masked MSE {rec['mse']:.4f} ({rec['mse_ratio']:.3f} x gene mean)"]
    for key, cell in metrics["cells"].items():
        reps = cell["representations"]
        best = best_pca(reps)
        summary.append(f"{key}: kNN macro-F1 {reps['exceiver']['knn_macro_f1']:.3f} vs {best} "
                       f"{reps[best]['knn_macro_f1']:.3f}")
    print(f"wrote {args.out}/report.md: " + "; ".join(summary))


def run_demo(args: argparse.Namespace) -> None:
    from exceiver.demo import run_demo as demo

    print(demo(args.out, max_minutes=args.max_minutes, seed=args.seed, overwrite=args.overwrite,
               progress=not args.quiet))


def run_import_original(args: argparse.Namespace) -> None:
    from exceiver.model import import_original

    model = import_original(args.checkpoint, genes=args.genes, scaler=args.scaler)
    model.save(args.out, overwrite=args.overwrite)
    kind = f"classifier of {len(model.classes)} classes" if model.classes else "masked-expression model"
    print(f"wrote {args.out}: {model} ({kind}, paper-compatible)")


def check_up_front(args: argparse.Namespace) -> None:
    """What every command can refuse before reading a file: a device this machine lacks, an output
    that is there already (training options are checked by TrainingConfig, also up front)."""
    from exceiver.io import check_output_dir

    if getattr(args, "device", None) is not None:
        inference_device(args.device)
    if args.command in FILE_OUTPUTS and args.out.exists() and not args.overwrite:
        raise ExceiverInputError(f"{args.out} already exists; choose another output or pass --overwrite")
    if args.command in FOLDER_OUTPUTS:
        check_output_dir(args.out, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lightning.pytorch", "lightning.fabric"):  # they set up their own INFO handlers
        logging.getLogger(name).setLevel(level)
    runners = {"pretrain": run_pretrain, "embed": run_embed, "finetune": run_finetune, "predict": run_predict,
               "evaluate": run_evaluate, "impute": run_impute, "perturb": run_perturb, "demo": run_demo,
               "import-original": run_import_original, "build-corpus": run_build_corpus}
    try:
        with speaking("cli"):
            check_up_front(args)
            runners[args.command](args)
    except (ExceiverInputError, ModelFileError, TrainingError) as err:
        print(f"exceiver {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
