"""Exponential moving average of a model's weights (torchvision's `--model-ema`), without host syncs.

torch's `AveragedModel.update_parameters` tests `self.n_averaged == 0` on a device tensor every call: one host
synchronisation per step on a GPU. Here the update count is a Python int and the update is one fused
`_foreach_lerp_` over the parameters and floating buffers (BN statistics), as torchvision's EMA averages them
(`use_buffers=True`). The state dict has the plain model's keys, so it loads into a bare model for export and
evaluation, and back into `EMA.module` on resume.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # Parameters and floating buffers (BN running statistics) are averaged, as torch's AveragedModel does
        # with use_buffers=True (torchvision's EMA); integer buffers (num_batches_tracked) are copied.
        mine, theirs, counters = [], [], []
        for a, b in zip([*self.module.parameters(), *self.module.buffers()],
                        [*model.parameters(), *model.buffers()], strict=True):
            (mine if a.is_floating_point() else counters).append(a)
            (theirs if a.is_floating_point() else counters).append(b.detach())
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            # ema <- ema + (1 - decay) * (param - ema) == decay * ema + (1 - decay) * param
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        for a, b in zip(counters[::2], counters[1::2], strict=True):
            a.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"], strict=True)
        self.updates = int(state["updates"])
