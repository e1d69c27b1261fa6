"""Pieces shared by the ResNet variants: convolutions, shortcuts (paper section 3.3), init, checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

ShortcutOption = Literal["A", "B", "C"]
SHORTCUT_OPTIONS: tuple[str, ...] = ("A", "B", "C")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (every conv is followed by BN, paper section 3.4)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias: the bottleneck's reduce/restore layers and projection shortcuts."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut option A (paper section 3.3): identity with extra zero channels; parameter-free.

    When the stride is 2 the identity is subsampled (every other pixel), which picks the same pixels
    as a 1x1 stride-2 projection, so the output size matches the residual branch for odd sizes too.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"zero padding cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C_in, H/s, W/s)
        x = F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))  # (N, C_out, H/s, W/s)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def make_shortcut(
    option: ShortcutOption, in_channels: int, out_channels: int, stride: int
) -> nn.Module | None:
    """The shortcut of one block under option A, B or C of paper section 3.3 (``None`` = identity).

    A: identity, zero-padding (``ZeroPadShortcut``) where the shape changes; no parameters.
    B: identity, 1x1 projection + BN where the shape changes (torchvision's ``downsample``, the default).
    C: 1x1 projection + BN on every block.
    Projections are ``nn.Sequential(conv, bn)`` so their keys are ``downsample.0`` / ``downsample.1`` as in
    torchvision.
    """
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_OPTIONS} (paper section 3.3), got {option!r}")
    shape_changes = stride != 1 or in_channels != out_channels
    if option == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride) if shape_changes else None
    if option == "B" and not shape_changes:
        return None
    return nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResidualBlock(nn.Module):
    """Base of every block: knows its width multiplier and the BN that closes its residual branch."""

    expansion: ClassVar[int]  # output channels / ``channels`` argument
    num_convs: ClassVar[int]  # weighted layers on the main path, for the paper's depth count

    def last_norm(self) -> nn.BatchNorm2d:
        """The BN whose weight ``zero_init_residual`` zeroes so the residual branch starts at 0."""
        raise NotImplementedError


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """He init (He et al. 2015 "Delving deep", used by paper section 3.4) and unit BN, as torchvision.

    ``zero_init_residual`` zeroes the last BN weight of every residual branch so each block starts as its
    shortcut (Goyal et al. 2017, section 5.1; torchvision's flag of the same name).  Linear layers keep
    PyTorch's default init, as torchvision does.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, ResidualBlock):
                nn.init.zeros_(module.last_norm().weight)


@contextlib.contextmanager
def _keep_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Undo the BN running-statistics update of a recomputed forward.

    Activation checkpointing runs each block's forward a second time during backward; in training mode BN
    would then fold the same batch into ``running_mean``/``running_var`` twice.
    """
    saved = [
        (norm, norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_batches_tracked is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, mean, var, count in saved:
                norm.running_mean.copy_(mean)  # type: ignore[union-attr]
                norm.running_var.copy_(var)  # type: ignore[union-attr]
                norm.num_batches_tracked.copy_(count)  # type: ignore[union-attr]


def run_stage(stage: nn.Sequential, x: Tensor, checkpoint_activations: bool) -> Tensor:
    """Run one stage; with ``checkpoint_activations`` (training with grad only) checkpoint each block.

    Only each block's input is kept; its inner activations are recomputed in backward, trading about one
    extra forward for activation memory.  Non-reentrant checkpointing (``use_reentrant=False``) is the
    variant PyTorch recommends.
    """
    if not (checkpoint_activations and stage.training and torch.is_grad_enabled()):
        return stage(x)
    for block in stage:
        if torch.compiler.is_compiling():
            # Compiled checkpointing recomputes from the traced graph, where the BN buffer updates are
            # mutations that are not replayed; dynamo also rejects a custom ``context_fn``.
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint(
                block,
                x,
                use_reentrant=False,
                context_fn=lambda block=block: (contextlib.nullcontext(), _keep_norm_statistics(block)),
            )
    return x
