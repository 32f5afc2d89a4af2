"""Errors that speak to the user: what is wrong with their input, and how to fix it, in the words of
the interface they use: `--gene-key gene_symbol` on the command line, `gene_key='gene_symbol'` in
Python (the command line says so once, in `exceiver.cli.main`, with `speaking("cli")`)."""

from __future__ import annotations

import contextlib
import contextvars
import shlex
from collections.abc import Iterator, Mapping


class ExceiverInputError(ValueError):
    """A dataset, gene list or option cannot be used as given."""


class ModelFileError(ValueError):
    """A model folder or checkpoint is missing, corrupt, or was not written by exceiver."""


class TrainingError(RuntimeError):
    """Training ran but produced no usable model (e.g. the loss diverged)."""


class Interrupted(RuntimeError):
    """A signal stopped a command; `checkpoint` is where a training run can be resumed from.
    The command line exits with 128 + the signal's number, as a shell reports a killed process."""

    def __init__(self, signum: int, message: str, checkpoint=None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


INTERFACES = ("python", "cli")
_interface = contextvars.ContextVar("exceiver_interface", default="python")

# Python keywords whose command-line option is named differently (the others: `--` + dashes).
CLI_NAMES = {"key_added": "--key", "expression_loss_weight": "--expression-weight", "groups": "--group",
             "label_keys": "--label-key", "class_loss_weight": "--class-weight", "query_genes": "--query-gene"}
# Choices that are flags of their own on the command line (finetune's modes).
CLI_CHOICES = {("mode", "freeze"): "--freeze", ("mode", "scratch"): "--from-scratch"}
_FLAG = object()


@contextlib.contextmanager
def speaking(interface: str) -> Iterator[None]:
    """Messages raised inside the block name options as `interface` ("cli" or "python") spells them."""
    if interface not in INTERFACES:
        raise ValueError(f"interface must be one of {INTERFACES}, got {interface!r}")
    token = _interface.set(interface)
    try:
        yield
    finally:
        _interface.reset(token)


def option(name: str, value=_FLAG) -> str:
    """An option as the user would write it: `option("gene_key", "gene_symbol")` is
    `--gene-key gene_symbol` on the command line and `gene_key='gene_symbol'` in Python;
    `option("overwrite", True)` is `--overwrite`; without a value, the option's name alone."""
    if _interface.get() == "cli":
        if value is not _FLAG and (name, str(value)) in CLI_CHOICES:
            return CLI_CHOICES[name, str(value)]
        flag = CLI_NAMES.get(name, "--" + name.replace("_", "-"))
        return flag if value is _FLAG or value is True else f"{flag} {shlex.quote(str(plain(value)))}"
    return name if value is _FLAG else f"{name}={plain(value)!r}"


def plain(value):
    """`value` with numpy and pandas scalars and containers turned into Python ones, so that a
    message shows ['CD3E', 71], not [np.str_('CD3E'), np.int64(71)]."""
    import numpy as np  # here: the command line starts without them
    import pandas as pd

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping | pd.Series):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray | pd.Index):
        return [plain(v) for v in value]
    return value
