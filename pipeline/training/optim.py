"""Optimizer construction: weight decay split by tensor rank (nanoGPT), torchvision's norm_weight_decay."""

from __future__ import annotations

import inspect
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


def _params_device_type(model: nn.Module) -> str:
    """"cuda" when every trainable parameter is a floating CUDA tensor (what fused kernels require), else the
    device type of the first one ("cpu" for a model without parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and all(p.is_cuda and torch.is_floating_point(p) for p in params):
        return "cuda"
    return params[0].device.type if params else "cpu"


def _supports(opt_cls: type[torch.optim.Optimizer], kwarg: str) -> bool:
    return kwarg in inspect.signature(opt_cls.__init__).parameters


def step_kwargs(opt_cls: type[torch.optim.Optimizer], device_type: str) -> dict[str, bool]:
    """How the optimizer steps: {"fused": True} on CUDA when this torch's `opt_cls` takes `fused` ({"foreach":
    True} when it only takes `foreach`); {} elsewhere, so CPU runs step exactly as before (torch's default).

    Why fused on CUDA: one kernel for all parameters, and no host sync under fp16. torch/optim/sgd.py
    (`SGD.__init__`): `fused=True` sets `self._step_supports_amp_scaling = True`, and its first step checks every
    param with `_device_dtype_check_for_fused` (floating point, on a fused-capable device). torch/amp/grad_scaler.py
    (`GradScaler.step`): for such an optimizer it hands `grad_scale` and the `found_inf` tensor to the optimizer
    (the fused kernel unscales and skips an inf/nan step on the device) instead of `_maybe_opt_step`, whose
    `sum(v.item() for v in found_inf_per_device.values())` blocks the host once per step."""
    if device_type != "cuda":
        return {}
    if _supports(opt_cls, "fused"):
        return {"fused": True}
    return {"foreach": True} if _supports(opt_cls, "foreach") else {}


def build_optimizer(model: nn.Module, train: Any, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s parameters, which must already be on their training device (the
    fused/foreach choice reads it; see step_kwargs)."""
    groups = param_groups(model, train.weight_decay, train.norm_weight_decay)
    device_type = _params_device_type(model)
    if train.opt == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, nesterov=train.nesterov,
                               **step_kwargs(torch.optim.SGD, device_type))
    if train.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **step_kwargs(torch.optim.AdamW, device_type))
    raise ValueError(f"unknown optimizer {train.opt!r}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(state)` keeping how this optimizer steps: torch restores every key of the saved
    param groups, `fused`/`foreach` included, so a checkpoint written on a GPU would resume fused on a CPU (and
    one from before fused stepping would resume unfused on a GPU). The step implementation is the device's
    (step_kwargs), not the checkpoint's."""
    kept = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, kept, strict=True):
        group.update(keys)


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
