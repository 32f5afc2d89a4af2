"""The one training driver, used by `pretrain` and `finetune`: a Lightning Trainer over a plan and
a data module, a time budget that the schedule follows, early stopping, checkpoints and clean
stops on signals (train/checkpoints.py), and the output folder staged so that it appears only
when the run succeeded."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from exceiver.data.datamodule import CellDataModule
from exceiver.errors import ExceiverInputError, TrainingError
from exceiver.outputs import atomic_dir
from exceiver.progress import messages_above_bars
from exceiver.train.checkpoints import Checkpointing, RunGuard, RunState
from exceiver.train.config import TrainingConfig
from exceiver.train.plans import TrainingPlan


class TimeBudgetSchedule(Callback):
    """With a time budget, re-plan the cosine horizon from the measured step time, so that the
    decay ends when the budget does. Speed is measured from step `every` on (start-up excluded);
    the warm-up is never changed; rank 0's estimate is broadcast so that all processes agree."""

    def __init__(self, max_seconds: float, every: int = 25):
        self.max_seconds, self.every = max_seconds, every
        self.step_budget, self.elapsed = None, 0.0  # a resumed run continues the interrupted one's

    def on_train_start(self, trainer: L.Trainer, plan: TrainingPlan) -> None:
        self.start, self.mark = time.monotonic() - self.elapsed, None
        if self.step_budget is None:
            self.step_budget = plan.planned_steps

    def state_dict(self) -> dict:
        return {"step_budget": self.step_budget, "elapsed": time.monotonic() - self.start}

    def load_state_dict(self, state: dict) -> None:
        self.step_budget, self.elapsed = state["step_budget"], state["elapsed"]

    def on_train_batch_end(self, trainer: L.Trainer, plan: TrainingPlan, *args) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every:
            return
        now = time.monotonic()
        if self.mark is None:
            self.mark = (now, step)
            return
        seconds_per_step = (now - self.mark[0]) / (step - self.mark[1])
        remaining = (self.max_seconds - (now - self.start)) / seconds_per_step
        planned = int(min(self.step_budget, step + max(remaining, 0)))
        planned = trainer.strategy.broadcast(planned, src=0)
        plan.planned_steps = max(planned, step + 1, plan.warmup_steps + 1)


@dataclass
class FitResult:
    """What a run did: its best validation metrics and how it ended."""

    best_metrics: dict
    epochs: int
    steps: int
    seconds: float  # of this session (a resumed run's earlier sessions are not counted)
    stopped_by: str
    extra: dict  # resumed_from_step where a run was resumed; monitor where it had an embedding monitor

    def summary(self) -> dict:
        return {**self.best_metrics, "epochs": self.epochs, "steps": self.steps, "seconds": self.seconds,
                "stopped_by": self.stopped_by, **self.extra}


class Trained(Protocol):
    def write(self, folder: Path) -> None: ...


def fit(plan: TrainingPlan, data: CellDataModule, training: TrainingConfig, run: RunState | None = None, *,
        identity: dict, build: Callable[[FitResult], Trained], overwrite: bool = False,
        checkpointing: Checkpointing | None = None, progress: bool = True) -> Trained:
    """Train with Lightning, load the best validated weights into `plan.module` (on the CPU, in
    eval mode) and return `build(result)`, the trained model. With a run state (the run writes
    an output folder, claimed by `training_output`) the run checkpoints and logs beside it,
    resumes from it when asked, and the model writes itself into the folder, which appears only
    if everything succeeded. `identity` says what the run is (a resume must match it). In a
    distributed run every process trains; only rank 0 writes."""
    checkpointing = checkpointing or Checkpointing()
    metric, mode = plan.criterion
    callbacks: list[Callback] = [EarlyStopping(monitor=metric, mode=mode, patience=training.patience),
                                 RunGuard(run, checkpointing.every_minutes * 60)]
    max_time = None
    if training.max_minutes is not None:
        max_time = {"seconds": training.max_minutes * 60}
        callbacks.append(TimeBudgetSchedule(training.max_minutes * 60))
    validation = {}
    if training.val_every_steps:
        validation = dict(val_check_interval=training.val_every_steps, check_val_every_n_epoch=None)
    resume_from = None
    if run is not None:  # rank 0 records or checks the run; the others read its checkpoint
        resume_from = run.begin(identity, resume=checkpointing.resume) if _writes() else \
            (run.checkpoint if checkpointing.resume else None)
    with _log_folder(run) as folder:
        try:
            trainer = L.Trainer(
                accelerator=training.accelerator, devices=training.devices, num_nodes=training.num_nodes,
                strategy=training.strategy, precision=training.precision, max_epochs=training.max_epochs,
                max_time=max_time, **validation, gradient_clip_val=training.grad_clip, callbacks=callbacks,
                logger=CSVLogger(save_dir=folder, name="logs", version=""), enable_checkpointing=False,
                log_every_n_steps=max(1, min(10, data.n_train_cells // training.batch_size)),
                enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                default_root_dir=folder,
                use_distributed_sampler=False,  # the loaders deal batches to processes themselves
            )
        except (MisconfigurationException, ValueError, TypeError) as err:  # what devices.py could not foresee
            message = " ".join(str(err).split())  # one line
            raise ExceiverInputError(f"Lightning refuses these training settings: {message}") from err
        start = time.monotonic()
        with messages_above_bars(), _compute_threads(training.num_workers):
            # Lightning's own use of a torch API deprecated in torch 2.13: noise for users.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            trainer.fit(plan, datamodule=data, ckpt_path=resume_from, weights_only=True)
            # The budget ended before the first validation; a monitor scores the final weights too.
            if plan.best_state is None or (plan.embedding_monitor is not None
                                           and plan.last_round_step != trainer.global_step):
                trainer.validate(plan, datamodule=data, verbose=False)
    if plan.best_state is None:
        raise TrainingError(
            "training produced no finite validation loss (the loss diverged to NaN or infinity): "
            "try a lower learning_rate or 32-bit precision"
        )
    plan.module.load_state_dict(plan.best_state)
    plan.module.cpu().eval()
    seconds = time.monotonic() - start
    summary = {}
    if run is not None and resume_from is not None:
        summary["resumed_from_step"] = run.resumed_from_steps()[-1]
    if plan.embedding_monitor is not None:
        summary["monitor"] = plan.embedding_monitor.describe()
    result = FitResult(dict(plan.best_metrics), trainer.current_epoch, trainer.global_step,
                       round(seconds, 1), _stop_reason(trainer, training), summary)
    model = build(result)
    if run is not None and trainer.is_global_zero:
        with atomic_dir(run.out, overwrite=overwrite) as staged:
            model.write(staged)
            run.finish(staged, keep_checkpoint=checkpointing.keep)
        run.remove()
    return model


def _writes() -> bool:
    return rank_zero_only.rank == 0


@contextlib.contextmanager
def _compute_threads(num_workers: int):
    """Threads for the training steps: OMP_NUM_THREADS where the user set it, else the cores this
    process may use, less one per data-loader process. Steps are many small ops, and threads that
    outnumber the free cores make each op wait for a descheduled thread (measured: 6x slower with
    two 2-thread runs on 2 cores than with two 1-thread runs). Libraries that share torch's OpenMP
    runtime can change its team size behind its back, so it is set here, then restored."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(wanted) if wanted.isdigit() and int(wanted) > 0 else cores - num_workers
    torch.set_num_threads(max(1, min(threads, cores)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _log_folder(run: RunState | None) -> contextlib.AbstractContextManager:
    """Training logs go to the run's folder (they survive an interruption and move into the
    output at the end); runs without an output, and processes other than rank 0, log to a
    scratch folder."""
    if run is not None and _writes():
        return contextlib.nullcontext(run.folder)
    return tempfile.TemporaryDirectory(prefix="exceiver-")


def _stop_reason(trainer: L.Trainer, training: TrainingConfig) -> str:
    stopper = trainer.early_stopping_callback
    reason = getattr(stopper, "stopping_reason", None)  # Lightning >= 2.5
    stopped = reason.name != "NOT_STOPPED" if reason is not None else getattr(stopper, "stopped_epoch", 0) > 0
    if stopped:
        return "early_stopping"
    if trainer.current_epoch >= training.max_epochs:
        return "max_epochs"
    return "max_minutes"
