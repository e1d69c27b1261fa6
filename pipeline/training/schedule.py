"""Learning-rate schedules as pure functions of the step (nanoGPT style), unit-tested exactly."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int = 0,
    warmup_decay: float = 0.01,
    scheduler: str = "cosine",
    step_size: int = 30,
    gamma: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """LR for optimizer step `step` (0-based).

    1. Linear warmup from base_lr * warmup_decay to base_lr over `warmup_epochs` epochs (Goyal et al. 2017,
       torchvision's `lr_warmup_method=linear`), stepped per iteration rather than per epoch.
    2. Then `step`: base_lr * gamma ** (epoch // step_size) -- the paper's x0.1 at epochs 30 and 60;
       or `cosine`: from base_lr down to min_lr over the remaining steps (Loshchilov & Hutter 2017);
       or `linear`: straight down from base_lr to min_lr at the last step. With warmup_decay 1e-4 and
       min_lr 0 this is FFCV's "cyclic" ImageNet schedule (`get_cyclic_lr`: np.interp of the fractional epoch
       over [0, lr_peak_epoch, epochs] -> [1e-4 * lr, lr, 0], interpolated per iteration).
    """
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError("steps_per_epoch and epochs must be >= 1")
    warmup_steps = warmup_epochs * steps_per_epoch
    if step < warmup_steps:
        frac = step / warmup_steps
        return base_lr * (warmup_decay + (1.0 - warmup_decay) * frac)
    if scheduler == "step":
        epoch = step // steps_per_epoch
        return base_lr * gamma ** (epoch // step_size)
    if scheduler == "cosine":
        total = epochs * steps_per_epoch - warmup_steps
        t = min(step - warmup_steps, total) / max(total, 1)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))
    if scheduler == "linear":
        total = epochs * steps_per_epoch - warmup_steps
        t = min(step - warmup_steps, total) / max(total, 1)
        return base_lr + (min_lr - base_lr) * t
    raise ValueError(f"unknown lr scheduler {scheduler!r}; use 'cosine', 'linear' or 'step'")


def scale_lr(lr: float, from_batch: int, to_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): lr grows with the global batch size."""
    return lr * to_batch / from_batch
