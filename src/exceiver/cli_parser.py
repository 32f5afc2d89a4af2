"""The command line's parser: the top-level options, and each command's own from
`exceiver.commands`. Building it imports nothing heavy (no torch, no anndata), so `exceiver --help`
and option errors answer at once."""

from __future__ import annotations

import argparse

from exceiver.commands import evaluation, inference, training
from exceiver.commands.options import data_options, model_option, run_options, training_options
from exceiver.version import __version__

__all__ = ["COMMANDS", "build_parser", "data_options", "model_option", "run_options", "training_options"]

# Each command's declaration, in the order of `exceiver --help`.
COMMANDS = (training.add_pretrain, inference.add_embed, training.add_build_corpus, training.add_finetune,
            inference.add_predict, inference.add_annotate, inference.add_impute, inference.add_perturb,
            evaluation.add_evaluate, evaluation.add_demo, training.add_import_original)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a parsed command carries its `run` and `settings` functions."""
    parser = argparse.ArgumentParser(
        prog="exceiver", description="Exceiver: a single-cell gene expression language model.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"exceiver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser
