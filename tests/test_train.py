"""The learning-rate schedule and its time budget; the contrastive (invariance) objective."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY
from exceiver import ExceiverInputError
from exceiver.train import fit as fit_module
from exceiver.nn.objectives import subset_tokens
from exceiver.train.fit import TimeBudgetSchedule
from exceiver.train.plans import lr_factor


def test_lr_factor_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 10, 100, 0.05) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.05) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.05) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.05) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(100, 10, 100, 0.05) == pytest.approx(0.05)
    assert lr_factor(500, 10, 100, 0.05) == pytest.approx(0.05)
    factors = [lr_factor(s, 10, 100, 0.05) for s in range(120)]
    assert all(b <= a for a, b in zip(factors[10:], factors[11:]))


def test_time_budget_replans_the_horizon_from_measured_speed(monkeypatch):
    clock = iter([0.0, 7.0, 17.0, 27.0])  # start; step 25 (start-up, ignored); steps 50 and 75
    monkeypatch.setattr(fit_module.time, "monotonic", lambda: next(clock))
    plan = SimpleNamespace(planned_steps=10_000, warmup_steps=100)
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(broadcast=lambda x, src: x))
    schedule = TimeBudgetSchedule(max_seconds=100.0, every=25)
    schedule.on_train_start(trainer, plan)
    for step in (25, 50):
        trainer.global_step = step
        schedule.on_train_batch_end(trainer, plan)
    # 25 steps in 10 s: 0.4 s per step; 83 s left -> 207 more steps after step 50.
    assert plan.planned_steps == 50 + int(83 / 0.4)
    trainer.global_step = 75
    schedule.on_train_batch_end(trainer, plan)
    assert plan.planned_steps == int(75 + 73 / 0.4)
    assert plan.warmup_steps == 100  # never changed


def test_time_budget_never_plans_beyond_the_step_budget_or_before_warmup(monkeypatch):
    clock = iter([0.0, 1.0, 1.001])
    monkeypatch.setattr(fit_module.time, "monotonic", lambda: next(clock))
    plan = SimpleNamespace(planned_steps=300, warmup_steps=100)
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(broadcast=lambda x, src: x))
    schedule = TimeBudgetSchedule(max_seconds=3600.0, every=25)
    schedule.on_train_start(trainer, plan)
    for step in (25, 50):
        trainer.global_step = step
        schedule.on_train_batch_end(trainer, plan)
    assert plan.planned_steps == 300


def test_subset_tokens_keeps_a_fraction_of_real_tokens_and_never_empties_a_cell():
    torch.manual_seed(0)
    mask = torch.zeros(3, 400, dtype=torch.bool)
    mask[0, :400] = True
    mask[1, :1] = True  # a one-token cell keeps its token
    subset = subset_tokens(mask, 0.5, torch.arange(3))
    assert not (subset & ~mask).any()
    assert 150 < subset[0].sum() < 250
    assert subset[1].sum() == 1 and subset[2].sum() == 0


def test_seeded_subsets_follow_the_cell_not_its_batch_position():
    mask = torch.ones(4, 600, dtype=torch.bool)
    cells = torch.tensor([10, 11, 12, 13])
    whole = subset_tokens(mask, 0.5, cells, salt=3)
    assert 250 < whole.sum(1).min() and whole.sum(1).max() < 350
    # Half of the batch (another process's share), in another order: the same subsets.
    assert torch.equal(subset_tokens(mask[[3, 1]], 0.5, cells[[3, 1]], salt=3), whole[[3, 1]])
    assert not torch.equal(subset_tokens(mask, 0.5, cells, salt=4), whole)  # a new step, new views
    assert not torch.equal(whole[0], whole[1])


@pytest.mark.slow
def test_contrastive_objective_trains_identity_and_saves_its_projection(counts_adata, tmp_path):
    from exceiver import Exceiver, pretrain

    model = pretrain(counts_adata, tmp_path / "m", model={**TINY, "contrastive_weight": 1.0}, max_epochs=3,
                     batch_size=32, progress=False)
    log = pd.read_csv(tmp_path / "m" / "logs" / "metrics.csv")
    contrast = log["train_contrastive_epoch"].dropna().to_numpy()
    assert np.isfinite(contrast).all() and contrast[-1] < contrast[0]  # views find each other better
    assert model.module.projection is not None
    again = Exceiver.load(tmp_path / "m")
    assert again.objectives.contrastive_weight == 1.0 and again.config.projection_head
    assert again.module.projection is not None


@pytest.mark.slow
def test_detection_objective_learns_which_genes_are_expressed(counts_adata, tmp_path):
    from exceiver import pretrain

    with pytest.raises(ExceiverInputError, match="needs zero_query_ratio"):
        pretrain(counts_adata, None, model={**TINY, "detection_weight": 1.0}, progress=False)
    model = pretrain(counts_adata, tmp_path / "m", model={**TINY, "zero_query_ratio": 1.0, "detection_weight": 1.0,
                                                          "contrastive_weight": 0.0},
                     max_epochs=15, batch_size=16, learning_rate=3e-3, progress=False)
    log = pd.read_csv(tmp_path / "m" / "logs" / "metrics.csv")
    detection = log["train_detection_epoch"].dropna().to_numpy()
    assert detection[-1] < 0.65 < np.log(2) < detection[0] + 0.02  # starts at chance, learns
    assert model.module.detection_head is not None and "val_zero_mse" not in model.metrics


def test_typed_training_options_are_the_training_config_fields():
    from exceiver.train.config import TrainingConfig, TrainingOptions, training_config

    assert set(TrainingOptions.__annotations__) == set(TrainingConfig.__dataclass_fields__)
    with pytest.raises(ExceiverInputError, match=r"unknown training options \['epochs'\]"):
        training_config({"epochs": 3})
