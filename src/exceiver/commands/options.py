"""Options that several commands share: where the counts are, the training settings
(`TrainingConfig`), checkpointing, and the model/data/device options of inference commands.
Building them imports nothing heavy (no torch, no anndata)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from exceiver.commands.defaults import Shown, add, described, of_function, text
from exceiver.nn.config import PRESETS
from exceiver.train.config import TrainingConfig

MODEL_HELP = "a model folder, or the name of a model shipped with exceiver (human-mouse-base, human-mouse-small)"
DEVICE_HELP = "cpu, cuda, cuda:1, mps, or auto"
AUTO_DEVICE = "auto: a CUDA GPU, else an Apple GPU (mps), else the CPU"
# What exceiver.inference.default_batch_size chooses (it needs torch; tests/test_cli_defaults.py compares).
INFERENCE_BATCH = "16 on the CPU, 256 on a GPU"
CHECKPOINTING = "exceiver.train.checkpoints:Checkpointing"  # where a run's checkpoint interval is decided


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


# Every TrainingConfig field, as an option: its type and what it sets.
TRAINING_FIELDS: dict[str, tuple] = {
    "max_epochs": (int, "passes over the training cells"),
    "max_minutes": (float, "time budget; the learning-rate schedule follows it"),
    "batch_size": (int, "cells per training step"),
    "learning_rate": (float, "peak learning rate"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup_steps": (int, "steps of linear learning-rate warm-up"),
    "min_lr_ratio": (float, "the cosine schedule ends at this fraction of the peak learning rate"),
    "grad_clip": (float, "gradient-norm clipping"),
    "gene_lr_mult": (float, "learning rate of per-gene embeddings and biases, as a multiple of the shared one"),
    "patience": (int, "validation rounds without improvement before early stopping"),
    "val_every_steps": (int, "validate every N steps"),
    "val_fraction": (float, "fraction of the cells held out for validation"),
    "seed": (int, "seed of the split, the initialisation and the masking"),
    "num_workers": (int, "data-loader worker processes"),
    "accelerator": (str, "Lightning accelerator: auto (CUDA, else an Apple GPU, else the CPU), cpu, gpu, ..."),
    "devices": (_devices, "Lightning devices: auto, N, ..."),
    "num_nodes": (int, "machines, for multi-node DDP (SLURM, torchrun)"),
    "strategy": (str, "Lightning strategy: auto, ddp, ..."),
    "precision": (str, "Lightning precision: 32-true, bf16-mixed, ..."),
}
# What the fields whose default is None do then.
TRAINING_UNSET = {"max_minutes": "none: --max-epochs bounds the run", "val_every_steps": "after each epoch"}


def data_options(args: argparse.Namespace) -> dict:
    """How the data is read: --gene-key, --layer, --allow-non-integer (and --gene-map, where the
    command has it) as keyword arguments."""
    chosen = {"gene_key": args.gene_key, "layer": args.layer, "allow_non_integer": args.allow_non_integer}
    return {**chosen, "gene_map": args.gene_map} if "gene_map" in vars(args) else chosen


def training_options(args: argparse.Namespace) -> dict:
    """The training options given on the command line (unset ones keep TrainingConfig's defaults,
    or the preset's)."""
    return {name: getattr(args, name) for name in TRAINING_FIELDS if getattr(args, name) is not None}


def run_options(args: argparse.Namespace) -> dict:
    """How a training run guards against interruption: resume, checkpoint interval, keep."""
    chosen = {} if args.checkpoint_minutes is None else {"checkpoint_minutes": args.checkpoint_minutes}
    return {"resume": args.resume, "keep_checkpoints": args.keep_checkpoints, **chosen}


VALUE_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a text"}


def model_option(setting: str) -> tuple[str, int | float | bool | str]:
    """FIELD=VALUE for a settable field of the preset's configs; the value's type is the field's."""
    from exceiver.nn.config import settable_fields

    field, sep, value = setting.partition("=")
    kinds = {k: v for k, v in settable_fields().items() if k != "paper_compatible"}  # import-original's alone
    if not sep or field not in kinds:
        raise argparse.ArgumentTypeError(f"{setting!r}: expected FIELD=VALUE with FIELD one of {sorted(kinds)}")
    if kinds[field] is bool and value.lower() in ("true", "false", "1", "0"):
        return field, value.lower() in ("true", "1")
    with contextlib.suppress(ValueError):
        if kinds[field] is not bool:
            return field, kinds[field](value)
    raise argparse.ArgumentTypeError(f"{setting!r}: {field} needs {VALUE_KINDS[kinds[field]]}")


def preset_default(value_of) -> Shown:
    """A default each preset chooses: "the preset's: 0.002 for default, 0.001 for paper" (or the
    one value, where the presets agree)."""
    def shown() -> str:
        values = {name: text(value_of(preset)) for name, preset in sorted(PRESETS.items())}
        if len(set(values.values())) == 1:
            return next(iter(values.values()))
        return "the preset's: " + ", ".join(f"{value} for {name}" for name, value in values.items())
    return shown


def training_default(field: str, *, presets: bool) -> Shown:
    """TrainingConfig's default of `field`, or, where a preset chooses (pretrain), the preset's."""
    if field not in TrainingConfig.__dataclass_fields__:
        raise LookupError(f"TrainingConfig has no field {field}")
    base = TrainingConfig.__dataclass_fields__[field].default
    if base is None:
        return described(TRAINING_UNSET[field])
    if presets:
        return preset_default(lambda preset: preset.training.get(field, base))
    return lambda: text(base)


def add_data_options(p: argparse.ArgumentParser, *, model: bool = False) -> None:
    """--gene-key, --layer, --allow-non-integer; `model`: a model reads the data (its own gene column
    and layer, where the data has them, are the defaults; --gene-map adds pairs to its own)."""
    own = ", or the model's own where the data has it" if model else ""
    add(p, "--gene-key", metavar="COL", help="var column holding gene identifiers", shown=described("var_names" + own))
    add(p, "--layer", help="layer holding raw counts, or raw for adata.raw", shown=described("X" + own))
    if model:
        p.add_argument("--gene-map", type=Path, metavar="FILE",
                       help="translate the dataset's genes through these pairs first (CSV or TSV of model gene, "
                            "dataset gene, e.g. human,mouse); a model's own pairs need no file: mouse data on a "
                            "human+mouse model is translated by itself")
    p.add_argument("--allow-non-integer", action="store_true",
                   help="accept counts that are mostly not integers (refused otherwise: normalised data is not counts)")


def add_training_options(p: argparse.ArgumentParser, function: str, *, presets: bool) -> None:
    """Every TrainingConfig field, and checkpointing; `presets`: the run's preset chooses some defaults."""
    for field, (kind, words) in TRAINING_FIELDS.items():
        add(p, f"--{field.replace('_', '-')}", type=kind, help=words, shown=training_default(field, presets=presets))
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --out (same data and settings) from its checkpoint")
    add(p, "--checkpoint-minutes", type=float, metavar="M", shown=of_function(CHECKPOINTING, "every_minutes"),
        help="save a resumable checkpoint every M minutes of training; SIGTERM and Ctrl+C save one too")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the last checkpoint in OUT/checkpoints/ (a pickle; by default the finished folder "
                        "holds only safetensors, JSON and text)")


def add_device_options(p: argparse.ArgumentParser, *, batches: bool = True) -> None:
    """--device (and the inference batch size)."""
    if batches:
        add(p, "--batch-size", type=int, help="cells per batch", shown=described(INFERENCE_BATCH))
    add(p, "--device", help=DEVICE_HELP, shown=described(AUTO_DEVICE))


def add_model(p: argparse.ArgumentParser, metavar: str = "MODEL_DIR", *, data: bool = True) -> None:
    """MODEL (a folder, or a shipped model's name; a classifier: a folder) and the DATA it reads."""
    p.add_argument("model", type=Path, metavar=metavar, **({"help": MODEL_HELP} if metavar == "MODEL_DIR" else {}))
    if data:
        p.add_argument("data", type=Path, metavar="DATA.h5ad")


def add_inference_options(p: argparse.ArgumentParser, *, model: str = "MODEL_DIR", out: str = "OUT.h5ad",
                          batches: bool = True) -> None:
    """MODEL DATA --out, where the counts are, (batch size and) device, --overwrite."""
    add_model(p, model)
    p.add_argument("--out", required=True, type=Path, metavar=out)
    add_data_options(p, model=True)
    add_device_options(p, batches=batches)
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing {out}")


def inference_settings(args: argparse.Namespace) -> dict:
    """Where the counts are, the batch size and the device, as keyword arguments."""
    return {"batch_size": args.batch_size, "device": args.device, **data_options(args)}

