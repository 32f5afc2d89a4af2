"""The learning-rate schedule and its time budget."""

from types import SimpleNamespace

import pytest

from exceiver import train
from exceiver.train import TimeBudgetSchedule, lr_factor


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
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
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
    monkeypatch.setattr(train.time, "monotonic", lambda: next(clock))
    plan = SimpleNamespace(planned_steps=300, warmup_steps=100)
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(broadcast=lambda x, src: x))
    schedule = TimeBudgetSchedule(max_seconds=3600.0, every=25)
    schedule.on_train_start(trainer, plan)
    for step in (25, 50):
        trainer.global_step = step
        schedule.on_train_batch_end(trainer, plan)
    assert plan.planned_steps == 300
