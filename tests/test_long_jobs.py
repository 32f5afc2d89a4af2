"""Long jobs: signals stop a run with a checkpoint and the scheduler's exit code, `--resume`
finishes it exactly as the uninterrupted run would, writers never race, outputs never clobber."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import TINY, synthetic_counts
from exceiver import pretrain
from exceiver.cli import main
from exceiver.errors import ExceiverInputError
from exceiver.outputs import claim
from exceiver.pretrain import learned_context

SETTINGS = [f"{k}={v}" for k, v in TINY.items()]


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    options = [a for s in SETTINGS for a in ("--set", s)]
    return ["pretrain", str(data), "--out", str(out), "--max-epochs", "8", "--batch-size", "16", "--seed", "2",
            "--accelerator", "cpu", *options, *extra]


def _interrupt(data: Path, out: Path, signum: int | None, arguments: list[str] | None = None) -> subprocess.CompletedProcess:
    """Start pretraining (or the command of `arguments`) in a subprocess, a checkpoint every
    step, wait for its first checkpoint, then send `signum` (SIGKILL where None)."""
    arguments = arguments or _command(data, out)
    command = [sys.executable, "-m", "exceiver.cli", "-q", *arguments, "--checkpoint-minutes", "0.0001"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    checkpoint = out.with_name(f".{out.name}.exceiver-run") / "last.ckpt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be interrupted: {process.stderr.read()}"
    process.send_signal(signum or signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs compared step for step use one thread in this process and in its subprocesses alike:
    a reduction split over another number of threads rounds differently, and Adam amplifies such
    differences in parameters whose gradients are nearly zero (attention key biases)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def cells_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("long") / "cells.h5ad"
    synthetic_counts(n_cells=400, seed=4).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def uninterrupted(cells_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "model"
    assert main(["-q", *_command(cells_file, out)]) == 0
    return out


def _same_run(resumed: Path, whole: Path, monitor: str = "val_counts") -> dict:
    metrics, expected = (json.loads((p / "metrics.json").read_text()) for p in (resumed, whole))
    assert metrics["steps"] == expected["steps"] and metrics["epochs"] == expected["epochs"]
    assert 0 < metrics["resumed_from_step"] < metrics["steps"] and "resumed_from_step" not in expected
    a, b = load_file(resumed / "model.safetensors"), load_file(whole / "model.safetensors")
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in b)  # the same run, step for step
    assert metrics[monitor] == pytest.approx(expected[monitor], rel=1e-5)
    return metrics


def _only_safe_files(folder: Path) -> bool:
    """A finished model folder: safetensors, JSON and text only (nothing that unpickles)."""
    return all(p.suffix in {".safetensors", ".json", ".txt", ".csv"} for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_resume_finishes_the_same_run(cells_file, uninterrupted, tmp_path,
                                                                              capsys):
    out = tmp_path / "model"
    stopped = _interrupt(cells_file, out, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("exceiver pretrain: SIGTERM: stopped at step") and "--resume" in last
    assert not out.exists()  # no partial output, only the run state beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.exceiver-run"]

    assert main(["-q", *_command(cells_file, out)]) == 2  # a fresh start must not discard it unasked
    assert "has an interrupted run (stopped at step" in capsys.readouterr().err
    assert main(["-q", *_command(cells_file, out, "--learning-rate", "0.01", "--resume")]) == 2
    assert "differs from the interrupted one (training.learning_rate" in capsys.readouterr().err

    assert main(["-q", *_command(cells_file, out, "--resume")]) == 0
    _same_run(out, uninterrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and _only_safe_files(out)
    logged = pd.read_csv(out / "logs" / "metrics.csv")["step"]  # one log across both sessions, in order
    assert logged.is_monotonic_increasing and logged.max() == json.loads((out / "metrics.json").read_text())["steps"] - 1


@pytest.mark.slow
def test_sigkill_loses_at_most_the_steps_since_the_last_checkpoint(cells_file, uninterrupted, tmp_path):
    out = tmp_path / "model"
    killed = _interrupt(cells_file, out, None)
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    assert main(["-q", *_command(cells_file, out, "--resume", "--keep-checkpoints")]) == 0
    _same_run(out, uninterrupted)
    assert (out / "checkpoints" / "last.ckpt").is_file()  # kept on request


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_checkpoint(cells_file, tmp_path):
    out = tmp_path / "model"
    stopped = _interrupt(cells_file, out, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert "SIGINT: stopped at step" in stopped.stderr and (tmp_path / ".model.exceiver-run" / "last.ckpt").is_file()


def test_resume_needs_an_interrupted_run(tmp_path, capsys):
    data = tmp_path / "cells.h5ad"
    synthetic_counts(n_cells=40).write_h5ad(data)
    assert main(["-q", *_command(data, tmp_path / "m", "--resume")]) == 2
    assert "nothing to resume: " in capsys.readouterr().err
    with pytest.raises(ExceiverInputError, match=r"resume=True needs the output folder"):
        pretrain(synthetic_counts(n_cells=40), None, model=TINY, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_finished_model_folders_hold_no_pickles_and_say_whether_context_was_learned(tmp_path, caplog):
    out = tmp_path / "model"
    # a learning rate that moves nothing: the model predicts gene means plus its random noise
    pretrain(synthetic_counts(n_cells=40), out, model=TINY, max_epochs=1, batch_size=16, learning_rate=1e-12,
             progress=False)
    assert _only_safe_files(out) and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_mse_ratio"] >= 1 and metrics["learned_context"] is False
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("THE MODEL LEARNED NO CONTEXT: its validation error is") and "max_minutes" in m
               for m in warnings)
    assert learned_context({"val_mse_ratio": 0.6}) == {"learned_context": True}
    assert learned_context({"val_mse_ratio": float("nan")}) == {"learned_context": False}  # diverged


def test_a_second_writer_of_an_output_fails_at_once(tmp_path, tiny_model_dir, counts_file):
    out = tmp_path / "embedded.h5ad"
    with claim(out, folder=False):  # this process is writing it
        second = subprocess.run([sys.executable, "-m", "exceiver.cli", "-q", "embed", str(tiny_model_dir),
                                 str(counts_file), "--out", str(out), "--overwrite"], capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2
        assert f"{out} is being written by another exceiver process (pid {os.getpid()})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]


def test_outputs_are_checked_writable_before_any_work(tiny_model_dir, counts_file, capsys):
    # /sys is read-only, even for root (file permissions would not stop a root test runner)
    assert main(["-q", "evaluate", str(tiny_model_dir), str(counts_file), "--out", "/sys/exceiver-report"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("exceiver evaluate: error: cannot write /sys/exceiver-report: /sys is not writable")
    assert len(err.strip().splitlines()) == 1


def test_stale_staging_of_a_killed_writer_is_cleared(tmp_path, tiny_model_dir, counts_file):
    stale = tmp_path / ".out.h5ad.partial-dead1234.h5ad"
    stale.write_text("half a file from a killed process")
    foreign = tmp_path / ".out.h5ad.notes"  # not exceiver's: kept
    foreign.write_text("mine")
    assert main(["-q", "embed", str(tiny_model_dir), str(counts_file), "--out", str(tmp_path / "out.h5ad")]) == 0
    assert not stale.exists() and foreign.read_text() == "mine"


@pytest.mark.slow
def test_a_streamed_corpus_resumes_mid_epoch_to_the_same_run(cells_file, tmp_path):
    corpus = tmp_path / "corpus"
    assert main(["-q", "build-corpus", str(cells_file), "--out", str(corpus), "--shard-cells", "100"]) == 0
    whole = tmp_path / "whole"
    assert main(["-q", *_command(corpus, whole)]) == 0
    out = tmp_path / "model"
    stopped = _interrupt(corpus, out, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    assert main(["-q", *_command(corpus, out, "--resume")]) == 0
    _same_run(out, whole)


@pytest.mark.slow
def test_finetuning_resumes_to_the_same_classifier(tiny_model_dir, counts_file, tmp_path):
    def finetuning(out: Path, *extra: str) -> list[str]:
        return ["finetune", str(tiny_model_dir), str(counts_file), "--label-key", "cell_type", "--out", str(out),
                "--max-epochs", "4", "--batch-size", "8", "--seed", "1", *extra]

    whole = tmp_path / "whole"
    assert main(["-q", *finetuning(whole)]) == 0
    out = tmp_path / "clf"
    stopped = _interrupt(counts_file, out, signal.SIGTERM, finetuning(out))
    assert stopped.returncode == 143, stopped.stderr
    assert main(["-q", *finetuning(out, "--from-scratch", "--resume")]) == 2  # another mode: not this run
    assert main(["-q", *finetuning(out, "--resume")]) == 0
    metrics = _same_run(out, whole, monitor="val_class_loss")
    assert metrics["mode"] == "full"
