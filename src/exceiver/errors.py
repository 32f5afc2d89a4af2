"""Errors that speak to the user: what is wrong with their input, and how to fix it."""


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


# Messages name options as the user gave them: `--gene-key gene_symbol` on the command line,
# `gene_key='gene_symbol'` in Python. The command line sets this once, at start.
interface = "python"


def option(name: str, value=None) -> str:
    """An option (and value) as the user would write it in the interface they are using; a
    value of True is a flag (`--resume`, `resume=True`)."""
    if interface == "cli":
        flag = "--" + name.replace("_", "-")
        return flag if value is None or value is True else f"{flag} {value}"
    return name if value is None else f"{name}={value!r}"
