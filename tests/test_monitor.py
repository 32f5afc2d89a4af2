"""The embedding monitor of pretraining: its logged score is the kNN macro-F1 of the monitored cells'
embedding, early stopping and the kept weights follow it on request, bad monitor data is refused
before any work, and a resumed run keeps the monitor's best score and its count of rounds since."""

from __future__ import annotations

import importlib
import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import TINY, synthetic_counts
from exceiver import ExceiverInputError, pretrain
from exceiver.cli import main
from exceiver.errors import Interrupted
from exceiver.evaluate.cells import knn_cross_validated
from exceiver.train.checkpoints import RunGuard
from exceiver.train.monitor import MONITOR_METRIC, EmbeddingMonitor

RUN = dict(model=TINY, batch_size=32, progress=False)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Runs compared step for step use the same number of threads (see tests/test_long_jobs.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def cells():
    return synthetic_counts(n_cells=200, seed=1)


@pytest.fixture(scope="module")
def labelled():
    """Other cells of the same three cell types, to monitor."""
    return synthetic_counts(n_cells=150, seed=2)


def _log(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "logs" / "metrics.csv").dropna(subset=[MONITOR_METRIC])


def _scores_by_step(scores: dict[int, float]):
    """A stand-in for `EmbeddingMonitor.score` that scores each step as `scores` says (else 0)."""
    return lambda monitor, trainer: scores.get(trainer.global_step, 0.0)


@pytest.mark.parametrize("criterion", ["loss", "embedding"])
def test_the_logged_score_is_the_knn_macro_f1_of_the_embedding_at_that_step(cells, labelled, tmp_path, criterion):
    out = tmp_path / "model"
    model = pretrain(cells, out, max_epochs=3, val_every_steps=4, monitor=criterion, monitor_data=labelled, **RUN)
    metrics, log = model.metrics, _log(out)
    # Every validation round (after steps 4, 8, 12, 16) and the end (step 18) is scored.
    assert metrics["steps"] == 18 and len(log) == 5 and log["step"].max() == 18
    # The kept weights' score, as the model embeds the monitored cells, scored by hand.
    embedding = model.embed(labelled, inplace=False, progress=False)
    by_hand = knn_cross_validated(embedding, labelled.obs["cell_type"].astype(str).to_numpy(), seed=0)["knn_macro_f1"]
    assert metrics[MONITOR_METRIC] == pytest.approx(by_hand, abs=1e-6)
    assert np.isclose(log[MONITOR_METRIC], by_hand, atol=1e-6).any() and 0 < by_hand <= 1  # logged in its round
    assert metrics["monitor"] == {"criterion": criterion, "data": "monitor data", "label_key": "cell_type",
                                  "n_cells": 150, "n_classes": 3}
    if criterion == "embedding":  # the kept weights are those of the best score
        assert metrics[MONITOR_METRIC] == pytest.approx(log[MONITOR_METRIC].max(), abs=1e-6)
    else:  # those of the lowest validation count loss, whatever their score
        assert metrics["val_counts"] == pytest.approx(log["val_counts"].min(), abs=1e-6)


def test_early_stopping_follows_the_monitor_only_when_asked(cells, labelled, monkeypatch):
    # Best at step 4, then no better: with patience 3, the run stops at the third round after it.
    monkeypatch.setattr(EmbeddingMonitor, "score", _scores_by_step({2: 0.5, 4: 0.9, 6: 0.8, 8: 0.9, 10: 0.7}))
    settings = dict(max_epochs=20, val_every_steps=2, patience=3, monitor_data=labelled, **RUN)
    model = pretrain(cells, monitor="embedding", **settings)
    assert (model.metrics["steps"], model.metrics["best_step"]) == (10, 4)
    assert model.metrics["stopped_by"] == "early_stopping" and model.metrics[MONITOR_METRIC] == pytest.approx(0.9)
    by_loss = pretrain(cells, **settings)  # the default criterion: the same scores stop nothing
    assert by_loss.metrics["steps"] > 10 and by_loss.metrics["monitor"]["criterion"] == "loss"


@pytest.mark.parametrize("settings, message", [
    (dict(monitor="embedding"), r"monitor='embedding' needs monitor_data"),
    (dict(monitor="best", monitor_data="unused"), r"monitor='best' is not a criterion: use monitor='loss' or monitor"),
    (dict(monitor_data="labelled", monitor_label_key="celltype"), r"obs has no column 'celltype'"),
    (dict(monitor_data="one class"), r"has a single class \('a'\)"),
    (dict(monitor_data="one cell of a class"), r"1 class of 'cell_type' has fewer than 2 cells \(b: 1\)"),
    (dict(monitor_data="labelled", monitor_cells=3), r"monitor_cells must be >= 4"),
    (dict(monitor_data="missing.h5ad"), r"dataset missing.h5ad does not exist"),
    (dict(monitor_data=["labelled", "labelled"]), r"monitor_data takes one AnnData or .h5ad path, got list"),
])
def test_bad_monitor_settings_are_refused_before_any_work(cells, labelled, settings, message, monkeypatch):
    datasets = {"labelled": labelled, "one class": labelled.copy(), "one cell of a class": labelled.copy()}
    datasets["one class"].obs["cell_type"] = "a"
    datasets["one cell of a class"].obs["cell_type"] = ["b"] + ["a"] * (labelled.n_obs - 1)
    data = settings.get("monitor_data")
    if data is not None:
        settings = {**settings, "monitor_data": [datasets[d] for d in data] if isinstance(data, list)
                    else datasets.get(data, data)}
    monkeypatch.setattr(importlib.import_module("exceiver.pretrain"), "pretraining_data",
                        lambda *a, **k: pytest.fail("read the training data"))
    with pytest.raises(ExceiverInputError, match=message):
        pretrain(cells, **settings, **RUN)


def test_a_sample_that_leaves_one_class_is_refused_before_training(cells, monkeypatch):
    rare = synthetic_counts(n_cells=100, seed=3)
    rare.obs["cell_type"] = ["b"] * 2 + ["a"] * 98  # 4 cells of 100 rarely hold both b cells
    monkeypatch.setattr("exceiver.train.plans.PretrainingPlan.training_step", lambda *a: pytest.fail("trained"))
    with pytest.raises(ExceiverInputError, match=r"1 class of 'cell_type' has 2 cells or more, and two are needed"):
        pretrain(cells, monitor_data=rare, monitor_cells=4, **RUN)


def test_the_command_line_takes_the_monitor_options(cells, labelled, tmp_path, capsys):
    data, monitored = tmp_path / "cells.h5ad", tmp_path / "labelled.h5ad"
    cells.write_h5ad(data)
    labelled.write_h5ad(monitored)
    command = ["-q", "pretrain", str(data), "--out", str(tmp_path / "m"), "--accelerator", "cpu", "--batch-size", "32",
               "--max-epochs", "1", *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
    assert main([*command, "--monitor", "embedding"]) == 2
    assert capsys.readouterr().err.strip() == ("exceiver pretrain: error: --monitor embedding needs --monitor-data: a "
                                               "labelled dataset (.h5ad or AnnData) whose --monitor-label-key column "
                                               "holds cell types")
    assert main([*command, "--monitor", "embedding", "--monitor-data", str(monitored), "--monitor-cells", "60"]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["monitor"] == {"criterion": "embedding", "data": "labelled", "label_key": "cell_type",
                                  "n_cells": 60, "n_classes": 3}
    assert 0 < metrics[MONITOR_METRIC] <= 1


def _stop_at(step: int):
    """RunGuard's step hook, made to receive SIGTERM after `step` (a checkpoint, then `Interrupted`)."""
    original = RunGuard.on_train_batch_end

    def hook(self, trainer, plan, *args):
        if trainer.global_step == step:
            self.received = signal.SIGTERM
        original(self, trainer, plan, *args)
    return hook


def test_a_resumed_run_keeps_the_best_score_and_the_rounds_since(cells, labelled, tmp_path, monkeypatch):
    # Best at step 4; interrupted at step 7, two rounds after it: patience 3 stops the run at step 10
    # only if the resumed run remembers both (else step 8's 0.8 would be a new best).
    monkeypatch.setattr(EmbeddingMonitor, "score", _scores_by_step({2: 0.5, 4: 0.9, 6: 0.7, 8: 0.8, 10: 0.6}))
    settings = dict(max_epochs=20, val_every_steps=2, patience=3, monitor="embedding", monitor_data=labelled, **RUN)
    whole = pretrain(cells, tmp_path / "whole", **settings)
    assert (whole.metrics["steps"], whole.metrics["best_step"]) == (10, 4)

    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        patch.setattr(RunGuard, "on_train_batch_end", _stop_at(7))
        with pytest.raises(Interrupted, match="stopped at step 7"):
            pretrain(cells, out, **settings)
    with pytest.raises(ExceiverInputError, match=r"differs from the interrupted one \(monitor.criterion: 'embedding' "
                                                 r"then, 'loss' now"):
        pretrain(cells, out, resume=True, **{**settings, "monitor": "loss"})
    resumed = pretrain(cells, out, resume=True, **settings)
    assert resumed.metrics["resumed_from_step"] == 7
    for key in ("steps", "best_step", "stopped_by", MONITOR_METRIC, "val_counts"):
        assert resumed.metrics[key] == whole.metrics[key], key
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in b)
    assert _log(out)[MONITOR_METRIC].tolist() == pytest.approx([0.5, 0.9, 0.7, 0.8, 0.6])
