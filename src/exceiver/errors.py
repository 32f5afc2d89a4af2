"""Errors that speak to the user: what is wrong with their input, and how to fix it."""


class ExceiverInputError(ValueError):
    """A dataset, gene list or option cannot be used as given."""


class ModelFileError(ValueError):
    """A model folder or checkpoint is missing, corrupt, or was not written by exceiver."""


class TrainingError(RuntimeError):
    """Training ran but produced no usable model (e.g. the loss diverged)."""
