"""Training runs that survive interruption: a run's resumable state beside its output, saved
every few minutes and when a signal asks the run to stop, and resumed on request.

While a run that writes `OUT` trains, a hidden folder beside it, `.OUT.exceiver-run/`, holds
`last.ckpt` (Lightning's checkpoint: weights, optimiser, schedule, loops, callbacks, the best
weights so far and the data position), `run.json` (what the run is, so that a resume with other
settings is refused, and where it stands) and the training logs. SIGTERM (what schedulers send at
a time limit) and SIGINT (Ctrl+C) stop the run after the current step with a checkpoint saved;
a second Ctrl+C aborts at once. SIGKILL cannot be caught: the last periodic checkpoint remains.
When the run finishes, its logs move into `OUT` and the folder is removed (the checkpoint is kept
in `OUT/checkpoints/` only on request), so a finished model folder holds no pickles.

A checkpoint is read back with `weights_only=True`: tensors and plain values, never code.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from exceiver.errors import ExceiverInputError, Interrupted, TrainingError, option
from exceiver.outputs import claim

log = logging.getLogger(__name__)

CHECKPOINT, RUN_INFO = "last.ckpt", "run.json"
# Training settings that may differ when a run is resumed: they do not change what it computes.
MAY_DIFFER = {"num_workers"}


@dataclass
class Checkpointing:
    """How a run that writes an output folder guards against interruption (train/checkpoints.py):
    `resume` continues the interrupted run of that folder; checkpoints every `every_minutes`;
    `keep` leaves the last one in the finished folder (`checkpoints/last.ckpt`, a pickle)."""

    resume: bool = False
    every_minutes: float = 10.0
    keep: bool = False

    def __post_init__(self) -> None:
        if not self.every_minutes > 0:
            raise ExceiverInputError(f"{option('checkpoint_minutes')} must be > 0, got {self.every_minutes}")


class RunState:
    """The resumable state of the training run that writes `out` (see the module docstring)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.folder = self.out.with_name(f".{self.out.name}.exceiver-run")
        self.checkpoint = self.folder / CHECKPOINT
        self.info_path = self.folder / RUN_INFO

    def info(self) -> dict | None:
        """run.json of an interrupted run that can be resumed (None if there is none)."""
        if not self.checkpoint.is_file():
            return None
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and info.get("written_by") == "exceiver" else None

    def describe(self, info: dict) -> str:
        return f"stopped at step {info.get('step', '?')}, saved {info.get('saved_at', '?')}"

    def prepare(self, *, resume: bool, overwrite: bool) -> None:
        """Before any work: a resume needs an interrupted run; a fresh start must not silently
        discard one (`overwrite` does, on purpose)."""
        info = self.info()
        if resume:
            if info is None:
                raise ExceiverInputError(f"nothing to resume: {self.out} has no interrupted run "
                                         f"(no checkpoint in {self.folder}); start it without {option('resume', True)}")
            return
        if info is not None and not overwrite:
            raise ExceiverInputError(
                f"{self.out} has an interrupted run ({self.describe(info)}): add {option('resume', True)} to continue it, "
                f"or {option('overwrite', True)} to start afresh and discard it")
        if self.folder.exists():  # a discarded run, or one killed before its first checkpoint
            shutil.rmtree(self.folder)

    def begin(self, identity: dict, *, resume: bool) -> Path | None:
        """Record the run (fresh) or check that it is the interrupted one (resume); returns the
        checkpoint to resume from."""
        identity = json.loads(json.dumps(identity))  # as it reads back from run.json
        if not resume:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_info({"written_by": "exceiver", "identity": identity, "step": 0})
            return None
        info = self.info() or {}
        differences = _differences(info.get("identity", {}), identity)
        if differences:
            raise ExceiverInputError(
                f"cannot resume {self.out}: this run differs from the interrupted one ({'; '.join(differences[:4])}); "
                "resume with the same data and settings")
        log.info("resuming %s from its checkpoint (%s)", self.out, self.describe(info))
        step = self._checkpoint_step(int(info.get("step", 0)))
        previous = self.folder / "logs" / "metrics.csv"
        if previous.is_file():  # Lightning's CSV logger would delete it: keep it for the final logs
            previous.replace(self.folder / f"metrics-until-step-{step}.csv")
        self._write_info({**info, "resumed_from_steps": [*info.get("resumed_from_steps", []), step]})
        return self.checkpoint

    def _checkpoint_step(self, recorded: int) -> int:
        """The step the checkpoint holds: run.json follows it, so a run killed between the two
        writes has run.json one save behind; the checkpoint is the truth."""
        if not self.checkpoint.is_file():
            return recorded
        saved = torch.load(self.checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(saved.get("global_step", recorded))

    def save(self, trainer: L.Trainer, reason: str) -> None:
        """Save a checkpoint (every process calls this; rank 0 writes), atomically."""
        staged = self.checkpoint.with_name(f".{CHECKPOINT}.partial")
        trainer.save_checkpoint(staged, weights_only=False)  # the whole training state
        if trainer.is_global_zero:
            os.replace(staged, self.checkpoint)
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
            now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            self._write_info({**info, "step": trainer.global_step, "epoch": trainer.current_epoch,
                              "saved_at": now, "reason": reason})
        trainer.strategy.barrier()

    def _log_parts(self) -> list[tuple[Path, int]]:
        """Logs of the sessions before each resume, with the step each one was resumed from."""
        parts = [(p, int(p.stem.rsplit("-", 1)[1])) for p in self.folder.glob("metrics-until-step-*.csv")]
        return sorted(parts, key=lambda part: part[1])

    def resumed_from_steps(self) -> list[int]:
        return list((self.info() or {}).get("resumed_from_steps", []))

    def finish(self, folder: Path, *, keep_checkpoint: bool) -> None:
        """Move the run's logs (one table across resumes) and, on request, its checkpoint into
        the staged output folder."""
        logs = folder / "logs"
        logs.mkdir(exist_ok=True)
        pieces = []
        # Steps logged after a checkpoint were run again after the resume: keep the rerun.
        for part, until in [*self._log_parts(), (self.folder / "logs" / "metrics.csv", None)]:
            if part.is_file():
                table = pd.read_csv(part)
                pieces.append(table if until is None else table[table["step"] < until])
        if pieces:
            pd.concat(pieces, ignore_index=True).to_csv(logs / "metrics.csv", index=False)
        if keep_checkpoint and self.checkpoint.is_file():
            (folder / "checkpoints").mkdir()
            shutil.copyfile(self.checkpoint, folder / "checkpoints" / CHECKPOINT)

    def remove(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def _write_info(self, info: dict) -> None:
        staged = self.info_path.with_name(f".{RUN_INFO}.partial")
        staged.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        os.replace(staged, self.info_path)


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if key in MAY_DIFFER or a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return out


@contextlib.contextmanager
def training_output(out: str | Path | None, *, overwrite: bool, resume: bool) -> Iterator[RunState | None]:
    """Claim a training run's output folder before any work (refused at once if another process
    writes it, if it may not be replaced, or if an interrupted run would be discarded
    unasked) and yield its run state. In a distributed run only the process of rank 0 claims and
    writes; the others share its run state (for checkpoints on a shared file system)."""
    if out is None:
        if resume:
            raise ExceiverInputError(f"{option('resume', True)} needs the output folder of the interrupted run")
        yield None
        return
    if rank_zero_only.rank != 0:
        yield RunState(out)
        return
    with claim(out, overwrite=overwrite, folder=True):
        run = RunState(out)
        run.prepare(resume=resume, overwrite=overwrite)
        try:
            yield run
        except (Interrupted, ExceiverInputError):
            raise  # a checkpoint is the point of the run state; a refused resume leaves it as it was
        except BaseException:
            if run.info() is None or isinstance(sys.exc_info()[1], TrainingError):
                run.remove()  # nothing to resume, or nothing worth resuming (a diverged run)
            else:
                log.warning("the run failed; its last checkpoint remains in %s (%s continues it, %s discards it)",
                            run.folder, option("resume", True), option("overwrite", True))
            raise


class RunGuard(Callback):
    """Checkpoints every `every_seconds` of training, and a clean stop on SIGTERM or SIGINT:
    the step in progress finishes, a checkpoint is saved (with a run state) and the run raises
    `Interrupted`, which the command line turns into exit code 128 + the signal."""

    def __init__(self, run: RunState | None, every_seconds: float):
        self.run, self.every_seconds = run, every_seconds
        self.received: int | None = None
        self.previous: dict[int, object] = {}
        self.rng: torch.Tensor | None = None

    # Signals --------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise Interrupted(signum, "interrupted twice: stopped at once, without a checkpoint")
        self.received = signum
        log.warning("received %s: stopping after this step%s", signal.Signals(signum).name,
                    " (Ctrl+C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else "")

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._handle)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    # Lightning hooks --------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, plan: L.LightningModule) -> None:
        if self.rng is not None:  # resumed: the random state of the interrupted run at its checkpoint
            torch.set_rng_state(self.rng)
            self.rng = None
        self.last_save = time.monotonic()
        self._install()

    def on_train_batch_end(self, trainer: L.Trainer, plan: L.LightningModule, *args) -> None:
        stop = self.received is not None
        due = self.run is not None and time.monotonic() - self.last_save >= self.every_seconds
        if trainer.world_size > 1:  # every process must take the same decision
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            due = trainer.strategy.broadcast(due, src=0)
        if self.run is not None and (stop or due):
            self.run.save(trainer, "signal" if stop else "periodic")
            self.last_save = time.monotonic()
        if stop:
            signum = self.received or signal.SIGTERM
            if self.run is None:
                raise Interrupted(signum, f"stopped at step {trainer.global_step}; nothing was saved "
                                                  "(no output folder)")
            raise Interrupted(
                signum, f"stopped at step {trainer.global_step}; checkpoint saved in {self.run.folder}: "
                        f"run the same command with {option('resume', True)} to continue", checkpoint=self.run.checkpoint)

    def on_train_end(self, trainer: L.Trainer, plan: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, plan: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def state_dict(self) -> dict:
        return {"rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng = state.get("rng")
