"""Exponential moving average of a model's weights (torchvision's `--model-ema`), without host syncs.

torch's `AveragedModel.update_parameters` tests `self.n_averaged == 0` on a device tensor every call: one host
synchronisation per step on a GPU. Here the update count is a Python int and the update is one fused
`_foreach_lerp_` over the parameters and floating buffers (BN statistics), as torchvision's EMA averages them
(`use_buffers=True`). The state dict has the plain model's keys, so it loads into a bare model for export and
evaluation, and back into `EMA.module` on resume.

The schedule is torchvision's classification reference (`--model-ema --model-ema-steps --model-ema-decay`):
one update every `every` optimizer steps of an epoch (batch index % every == 0), a decay per update rescaled
from the given decay by the run's length (`update_decay`), and during the lr warmup the average restarted at
every update, so it starts from the warmed-up weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def update_decay(decay: float, global_batch: int, every: int, epochs: int) -> float:
    """The decay of one update, as torchvision's reference derives it from `--model-ema-decay` (after pycls):
    adjust = world_size x batch_per_gpu x ema_steps / epochs (~ 1 / the run's update count, the dataset size left
    out), alpha = min(1, (1 - decay) x adjust), per-update decay = 1 - alpha. ResNet-50 V2 (1024 x 32 / 600,
    0.99998): 0.998908."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"train.model_ema_decay must be in (0, 1), got {decay}")
    if global_batch < 1 or every < 1 or epochs < 1:
        raise ValueError("global_batch, every and epochs must be >= 1")
    adjust = global_batch * every / epochs
    return 1.0 - min(1.0, (1.0 - decay) * adjust)


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_epochs: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay = decay
        self.every = every
        self.warmup_epochs = warmup_epochs
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def step(self, model: nn.Module, epoch: int, batch: int) -> None:
        """After optimizer step `batch` (0-based, within `epoch`): torchvision's `train_one_epoch` schedule."""
        if batch % self.every:
            return
        self.update(model)
        if epoch < self.warmup_epochs:
            self.updates = 0  # the next update copies the weights again (torchvision: n_averaged.fill_(0))

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
