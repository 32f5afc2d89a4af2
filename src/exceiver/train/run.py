"""One training run as `pretrain` and `finetune` make it: the options it takes, its output folder
claimed before any work, the random state seeded before the network is built, checkpoints and
resume (train/checkpoints.py), the fit, and the trained model written into the output."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from exceiver.data.datamodule import CellDataModule
from exceiver.train.checkpoints import Checkpointing, RunState, training_output
from exceiver.train.config import TrainingConfig, TrainingOptions, training_config
from exceiver.train.fit import FitResult, Trained, fit
from exceiver.train.plans import TrainingPlan

# The options of `RunOptions` that guard against interruption, and their `Checkpointing` fields.
CHECKPOINT_OPTIONS = {"resume": "resume", "checkpoint_minutes": "every_minutes", "keep_checkpoints": "keep"}


class RunOptions(TrainingOptions, total=False):
    """Keyword arguments of `pretrain` and `finetune`: the `TrainingConfig` fields and how the run
    guards against interruption (defaults: resume=False, checkpoint_minutes=10.0,
    keep_checkpoints=False)."""

    resume: bool
    checkpoint_minutes: float
    keep_checkpoints: bool


@dataclass(frozen=True)
class TrainingRun:
    """A claimed training run: its settings, checkpoints, run state (None without an output folder)
    and whether it may replace the output and shows progress."""

    settings: TrainingConfig
    checkpointing: Checkpointing
    state: RunState | None
    overwrite: bool
    progress: bool

    def seed(self) -> None:
        """Seed every random generator: called just before the network is built, so that the seed
        alone decides its initial weights and the data order."""
        L.seed_everything(self.settings.seed, workers=True, verbose=False)

    def fit(self, plan: TrainingPlan, data: CellDataModule, *, identity: dict,
            model: Callable[[dict], Trained]) -> Trained:
        """Train `plan` (train/fit.py) and return `model(metrics)`, the trained model, which the run
        writes into its output folder. `identity` says what the run is: a resume must match it.

        Parameters
        ----------
        plan, data
            The training plan (whose network `model` wraps) and its cells.
        identity
            What the run is (command, settings, data); recorded in run.json.
        model
            Builds the trained model from the run's metrics (`FitResult.summary`).

        Returns
        -------
        The trained model, with every weight trainable again (a plan may freeze weights it does not use).
        """
        def trained(result: FitResult) -> Trained:
            for param in plan.module.parameters():
                param.requires_grad = True
            return model(result.summary())

        return fit(plan, data, self.settings, self.state, identity=identity, build=trained, overwrite=self.overwrite,
                   checkpointing=self.checkpointing, progress=self.progress)


@contextlib.contextmanager
def training_run(out: str | Path | None, options: dict, *, defaults: dict | None = None, overwrite: bool = False,
                 progress: bool = True) -> Iterator[TrainingRun]:
    """Check a run's options, then claim its output folder before any work (refused at once if it
    may not be written, see `training_output`) and yield the run.

    Parameters
    ----------
    out
        The model folder the run writes (None: the model stays in memory).
    options
        `RunOptions` given by the caller.
    defaults
        Training options that apply where `options` gives none (a preset's).
    overwrite, progress
        Whether `out` may be replaced (and an interrupted run of it discarded); progress bars.

    Yields
    ------
    The `TrainingRun`.
    """
    training = {name: value for name, value in options.items() if name not in CHECKPOINT_OPTIONS}
    settings = training_config({**(defaults or {}), **training})
    checkpointing = Checkpointing(**{field: options[name] for name, field in CHECKPOINT_OPTIONS.items()
                                     if name in options})
    with training_output(out, overwrite=overwrite, resume=checkpointing.resume) as state:
        yield TrainingRun(settings, checkpointing, state, overwrite, progress)


def derived_model(base, **changes):
    """A model of the base's class with the base's fields (vocabulary, normalisation, how it reads
    data, ...) and `changes` (e.g. a new network, training record and metrics): every constructor
    argument is an attribute of the same name, so a field added to the model carries over.

    Parameters
    ----------
    base
        The model (`Exceiver`) the new one is derived from.
    changes
        Constructor arguments that differ from the base's.

    Returns
    -------
    The new model.
    """
    fields = {name: getattr(base, name) for name in inspect.signature(type(base)).parameters}
    return type(base)(**{**fields, **changes})
