"""The LR schedule is a pure function: exact values at chosen steps."""

from __future__ import annotations

import math

import numpy as np
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


def _ffcv_cyclic_lr(epoch: float, lr: float, epochs: int, lr_peak_epoch: int) -> float:
    """FFCV's rn50 schedule as its train_imagenet.py states it: get_cyclic_lr(epoch) = np.interp(epoch,
    [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0]), and within an epoch np.interp(step, [0, iters],
    [get_lr(epoch), get_lr(epoch + 1)]), i.e. the same interpolation at the fractional epoch."""
    return float(np.interp([epoch], [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])[0])


def test_linear_is_ffcvs_cyclic_schedule_at_every_step() -> None:
    # rn50_configs/rn50_16_epochs.yaml: lr 1.7, 16 epochs, lr_peak_epoch 2 (train_imagenet.py's default).
    spe, epochs = 7, 16
    kw = dict(base_lr=1.7, steps_per_epoch=spe, epochs=epochs, warmup_epochs=2, warmup_decay=1e-4,
              scheduler="linear", min_lr=0.0)
    for step in range(epochs * spe):
        assert lr_at(step, **kw) == pytest.approx(_ffcv_cyclic_lr(step / spe, 1.7, epochs, 2), abs=1e-12), step
    assert lr_at(2 * spe, **kw) == pytest.approx(1.7)  # the peak at epoch 2
    assert lr_at(epochs * spe, **kw) == pytest.approx(0.0, abs=1e-12)  # 0 at the end, and after it
    assert lr_at(10 * epochs * spe, **kw) == pytest.approx(0.0, abs=1e-12)


def test_ema_update_decay_is_torchvisions() -> None:
    from pipeline.training.ema import update_decay

    # ResNet-50 V2: --model-ema (decay 0.99998, steps 32) at 8 x 128 for 600 epochs.
    assert update_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert update_decay(0.99998, 1024, 32, 600) == pytest.approx(0.998908, abs=1e-6)
    assert update_decay(0.9, 64, 32, 4) == 0.0  # alpha capped at 1: every update copies the weights
    with pytest.raises(ValueError, match="model_ema_decay"):
        update_decay(1.0, 1024, 32, 600)


def test_ema_follows_torchvisions_update_schedule() -> None:
    """torchvision's train_one_epoch: `if i % model_ema_steps == 0: update_parameters(model)`, and during the warmup
    epochs `n_averaged.fill_(0)` after it (the next update copies). Same weights after 3 epochs of 5 steps."""
    import torch
    from torch import nn
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.training.ema import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ours = EMA(model, 0.7, every=2, warmup_epochs=1)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.7), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for epoch in range(3):
        for i in range(5):
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            ours.step(model, epoch, i)
            if i % 2 == 0:
                theirs.update_parameters(model)
                if epoch < 1:
                    theirs.n_averaged.fill_(0)
    for (k, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values(), strict=True):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-6), k
    # Not the model itself: the average after warmup spans 6 updates.
    assert not torch.allclose(ours.module[0].weight, model[0].weight)
