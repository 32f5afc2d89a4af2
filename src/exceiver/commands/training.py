"""The commands that make models: `pretrain` (and `build-corpus`, its on-disk data), `finetune`
and `import-original`; each command's options beside its settings and handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from exceiver.commands.defaults import add, add_command, given, of_function
from exceiver.commands.options import (add_data_options, add_model, add_training_options, data_options, model_option,
                                       preset_default, run_options, training_options)
from exceiver.nn.config import INIT_SETTINGS, PRESETS
from exceiver.outputs import claim

PRETRAIN = "exceiver.pretrain:pretrain"
BUILD_CORPUS = "exceiver.data.corpus:build_corpus"
FINETUNE = "exceiver.finetune:finetune"
IMPORT_ORIGINAL = "exceiver.model:import_original"


def add_pretrain(commands) -> None:
    p = add_command(commands, "pretrain", run_pretrain, pretrain_settings,
                    help="pretrain a model on raw counts (.h5ad)")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA.h5ad",
                   help=".h5ad files, or one corpus folder from build-corpus (streamed from disk)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    add(p, "--preset", choices=sorted(PRESETS), help="architecture, objectives and training settings",
        shown=of_function(PRETRAIN, "preset"))
    p.add_argument("--genes", type=Path, metavar="FILE", help="restrict the vocabulary to these genes (one per line)")
    add(p, "--n-top-genes", type=int, metavar="N",
        help="vocabulary: the N most variable genes of the training cells, 0 for all",
        shown=preset_default(lambda preset: preset.n_top_genes))
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
                        "--set n_latents=64 --set contrastive_weight=0 (repeat for several); with --init only "
                        f"the integration settings: {', '.join(INIT_SETTINGS)}")
    p.add_argument("--freeze-except-batches", action="store_true",
                   help="with --init and --batch-key: scArches' query step; every weight stays the model's but "
                        "the batch embeddings of DATA's new batches, which alone learn; embeddings (the query's "
                        "too) stay the model's, decoding in the new batches changes")
    add_data_options(p)
    add_training_options(p, PRETRAIN, presets=True)
    add_monitor_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")


def add_monitor_options(p: argparse.ArgumentParser) -> None:
    """The embedding monitor of pretraining (exceiver.train.monitor)."""
    p.add_argument("--monitor-data", type=Path, metavar="LABELLED.h5ad",
                   help="at every validation round and at the end, embed these labelled cells (raw counts) with the "
                        "model being trained and log the kNN macro-F1 of their cell types (monitor_knn_macro_f1)")
    add(p, "--monitor-label-key", metavar="COL", help="obs column of cell types in --monitor-data",
        shown=of_function(PRETRAIN, "monitor_label_key"))
    add(p, "--monitor-cells", type=int, metavar="N", help="the most labelled cells monitored (a seeded sample)",
        shown=of_function(PRETRAIN, "monitor_cells"))
    add(p, "--monitor", choices=("loss", "embedding"),
        help="what early stopping and the kept weights follow: the validation loss, or the monitor's score "
             "(embedding: needs --monitor-data)", shown=of_function(PRETRAIN, "monitor"))


def pretrain_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `pretrain` (options not given keep its defaults, or the preset's)."""
    return {"model": dict(args.model_options), "genes": args.genes, "gene_map": args.gene_map, "init": args.init,
            "extend_genes": args.extend_genes, "own_genes": args.own_genes, "batch_key": args.batch_key,
            "freeze_except_batches": args.freeze_except_batches, "overwrite": args.overwrite,
            "monitor_data": args.monitor_data,
            **given(args, preset="preset", n_top_genes="n_top_genes", monitor="monitor",
                    monitor_label_key="monitor_label_key", monitor_cells="monitor_cells"),
            **data_options(args), **run_options(args), **training_options(args)}


def run_pretrain(args: argparse.Namespace) -> None:
    """Pretrain an Exceiver by masked-expression prediction on one or more .h5ad files of raw
    counts."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.pretrain import pretrain

    model = pretrain(args.data, args.out, progress=not args.quiet, **pretrain_settings(args))
    if rank_zero_only.rank == 0:  # distributed runs execute this in every process
        print(f"wrote {args.out}: {model}")


def add_build_corpus(commands) -> None:
    p = add_command(commands, "build-corpus", run_build_corpus, build_corpus_settings,
                    help="convert .h5ad files into an on-disk corpus for pretraining")
    p.add_argument("data", nargs="+", type=Path, metavar="DATA.h5ad")
    p.add_argument("--out", required=True, type=Path, metavar="CORPUS_DIR", help="corpus folder to write")
    p.add_argument("--genes", type=Path, metavar="FILE", help="restrict the vocabulary to these genes (one per line)")
    add(p, "--shard-cells", type=int, metavar="N", help="cells per shard file",
        shown=of_function(BUILD_CORPUS, "shard_cells"))
    add_data_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CORPUS_DIR")


def build_corpus_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `build_corpus`."""
    return {"genes": args.genes, "overwrite": args.overwrite, **given(args, shard_cells="shard_cells"),
            **data_options(args)}


def run_build_corpus(args: argparse.Namespace) -> None:
    """Align .h5ad files of raw counts to one gene vocabulary and write them, chunk by chunk, as a
    sharded on-disk corpus that `exceiver pretrain CORPUS_DIR` streams with memory that does not
    grow with the cells."""
    from exceiver.data.corpus import build_corpus

    corpus = build_corpus(args.data, args.out, progress=not args.quiet, **build_corpus_settings(args))
    print(f"wrote {args.out}: {corpus.n_cells:,} cells, {len(corpus.vocab):,} genes, {len(corpus.shards)} shard(s)")


def add_finetune(commands) -> None:
    p = add_command(commands, "finetune", run_finetune, finetune_settings,
                    help="train a cell classifier from a pretrained model")
    add_model(p)
    p.add_argument("--label-key", required=True, metavar="COL", help="obs column with the labels")
    p.add_argument("--out", required=True, type=Path, metavar="CLF_DIR", help="classifier folder to write")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--freeze", action="store_true",
                      help="linear probe: logistic regression on the frozen cell embedding, fitted in closed form "
                           "(of the training options only --seed and --val-fraction apply)")
    mode.add_argument("--from-scratch", action="store_true", help="same architecture, random weights (a control)")
    add(p, "--class-weight", type=float, metavar="W", help="weight of the cross-entropy",
        shown=of_function(FINETUNE, "class_loss_weight"))
    add(p, "--expression-weight", type=float, metavar="W",
        help="weight of the masked-expression MSE beside cross-entropy (0: off)",
        shown=of_function(FINETUNE, "expression_loss_weight"))
    add(p, "--pretrained-lr-mult", type=float, metavar="M",
        help="learning rate of the pretrained weights, as a fraction of the new class head's",
        shown=of_function(FINETUNE, "pretrained_lr_mult"))
    add(p, "--min-cells-per-class", type=int, metavar="N", help="labelled cells every class needs",
        shown=of_function(FINETUNE, "min_cells_per_class"))
    add_data_options(p, model=True)
    add_training_options(p, FINETUNE, presets=False)
    p.add_argument("--overwrite", action="store_true", help="replace an existing CLF_DIR")


def finetune_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `finetune` (options not given keep its and TrainingConfig's defaults)."""
    mode = "freeze" if args.freeze else "scratch" if args.from_scratch else "full"
    return {"mode": mode, "overwrite": args.overwrite,
            **given(args, class_loss_weight="class_weight", expression_loss_weight="expression_weight",
                    pretrained_lr_mult="pretrained_lr_mult", min_cells_per_class="min_cells_per_class"),
            **data_options(args), **run_options(args), **training_options(args)}


def run_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a pretrained model to predict a label column of obs (class-token query; cross-
    entropy + masked-expression MSE), or fit a linear probe of its cell embedding (--freeze)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from exceiver.finetune import finetune

    chosen = finetune_settings(args)
    model = finetune(args.model, args.data, args.label_key, args.out, progress=not args.quiet, **chosen)
    if rank_zero_only.rank == 0:
        m = model.metrics
        print(f"wrote {args.out}: {len(model.classes)} classes, validation accuracy {m['val_accuracy']:.3f}, "
              f"macro-F1 {m['val_macro_f1']:.3f} ({chosen['mode']})")


def add_import_original(commands) -> None:
    p = add_command(commands, "import-original", run_import_original, import_original_settings,
                    help="import a checkpoint of the original release")
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL_DIR", help="model folder to write")
    add(p, "--genes", type=Path, metavar="FILE", help="the checkpoint's genes, one per line, in its order",
        shown=of_function(IMPORT_ORIGINAL, "genes", none="placeholder names"))
    p.add_argument("--scaler", type=Path, metavar="SCALER.npz",
                   help="the original StandardScaler: an .npz with 'mean' and 'scale' arrays, one value per gene")
    p.add_argument("--overwrite", action="store_true", help="replace an existing MODEL_DIR")


def import_original_settings(args: argparse.Namespace) -> dict:
    """The keyword arguments of `import_original`."""
    return {"genes": args.genes, "scaler": args.scaler}


def run_import_original(args: argparse.Namespace) -> None:
    """Convert a PyTorch Lightning checkpoint of the original Exceiver code into a model folder that
    computes exactly as the original (paper-compatible mode). Nothing in the file is executed."""
    from exceiver.model import import_original

    with claim(args.out, overwrite=args.overwrite, folder=True):  # refused now, not after the work
        model = import_original(args.checkpoint, **import_original_settings(args))
        model.save(args.out, overwrite=args.overwrite)
    kind = f"classifier of {len(model.classes)} classes" if model.classes else "masked-expression model"
    print(f"wrote {args.out}: {model} ({kind}, paper-compatible)")
