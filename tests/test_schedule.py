"""The LR schedule is a pure function: exact values at chosen steps."""

from __future__ import annotations

import math

import pytest

from pipeline.training.schedule import lr_at, scale_lr


def test_linear_warmup_then_cosine() -> None:
    kw = dict(base_lr=0.4, steps_per_epoch=10, epochs=5, warmup_epochs=1, warmup_decay=0.01, scheduler="cosine")
    assert lr_at(0, **kw) == pytest.approx(0.004)
    assert lr_at(5, **kw) == pytest.approx(0.4 * (0.01 + 0.99 * 0.5))
    assert lr_at(10, **kw) == pytest.approx(0.4)  # warmup ends at the peak
    assert lr_at(30, **kw) == pytest.approx(0.5 * 0.4 * (1 + math.cos(math.pi * 0.5)))  # half-way
    assert lr_at(50, **kw) == pytest.approx(0.0, abs=1e-12)  # end of training
    assert lr_at(500, **kw) == pytest.approx(0.0, abs=1e-12)  # past the end stays at min_lr


def test_paper_step_schedule() -> None:
    kw = dict(base_lr=0.1, steps_per_epoch=100, epochs=90, scheduler="step", step_size=30, gamma=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(29 * 100 + 99, **kw) == pytest.approx(0.1)
    assert lr_at(30 * 100, **kw) == pytest.approx(0.01)  # x0.1 at epoch 30
    assert lr_at(60 * 100, **kw) == pytest.approx(0.001)  # and at 60


def test_cosine_min_lr_and_bad_input() -> None:
    assert lr_at(10, base_lr=1.0, steps_per_epoch=5, epochs=2, min_lr=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="scheduler"):
        lr_at(0, base_lr=1.0, steps_per_epoch=1, epochs=1, scheduler="poly")
    with pytest.raises(ValueError):
        lr_at(0, base_lr=1.0, steps_per_epoch=0, epochs=1)


def test_linear_scaling_rule() -> None:
    assert scale_lr(0.1, 256, 1024) == pytest.approx(0.4)
    assert scale_lr(0.1, 256, 64) == pytest.approx(0.025)
