"""Optimizer construction: weight decay split by tensor rank (nanoGPT), torchvision's norm_weight_decay."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict[str, Any]]:
    """Two groups: matrices/conv kernels (ndim >= 2) get `weight_decay`; norm weights and biases
    (ndim <= 1) get `norm_weight_decay` (None = the same as weight_decay).

    Split by p.ndim rather than by name: it catches every BN/LayerNorm/bias whatever it is called.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    nwd = weight_decay if norm_weight_decay is None else norm_weight_decay
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": nwd})
    return groups


def build_optimizer(model: nn.Module, train: Any, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, train.weight_decay, train.norm_weight_decay)
    if train.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov)
    if train.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {train.opt!r}")


def mix_batch(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), one of them per batch with equal odds as
    torchvision's recipe does. Returns images and soft targets (N, num_classes).

    The random draws come from a NumPy generator on the host: drawing them from a torch generator and reading
    them back (`int(t)`, `float(t)`) would be a host synchronisation per step on a GPU."""
    target = nn.functional.one_hot(y, num_classes).to(x.dtype)
    choices = [a for a in ((mixup_alpha, "mixup"), (cutmix_alpha, "cutmix")) if a[0] > 0]
    if not choices:
        return x, target
    alpha, kind = choices[int(rng.integers(len(choices)))]
    lam = float(rng.beta(alpha, alpha))
    perm = torch.roll(torch.arange(x.shape[0], device=x.device), 1)
    if kind == "mixup":
        x = x * lam + x[perm] * (1 - lam)
    else:
        _, _, h, w = x.shape  # (N, C, H, W)
        cut = (1 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, target * lam + target[perm] * (1 - lam)
