"""ResNets of He et al. 2015, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385).

The ImageNet models (paper Table 1) keep torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``...) and its layout "v1.5": the stride of a down-sampling bottleneck sits on
the 3x3 conv, not on the first 1x1 as in the paper; torchvision weights load with ``strict=True``.
The same ``ResNet`` class builds the CIFAR-10 networks of section 4.2 (see ``cifar.py``) and the plain
networks of section 4.1 (``shortcut=None``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from pipeline.models.layers import (
    ResidualBlock,
    ShortcutOption,
    conv1x1,
    conv3x3,
    init_weights,
    make_shortcut,
    run_stage,
)
from pipeline.models.registry import register_builder

Stem = Literal["imagenet", "cifar"]

_PAPER = "He et al. 2015, arXiv:1512.03385"


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (paper Fig. 2 left, Table 1 for ResNet-18/34); ``residual=False`` is a plain block."""

    expansion: ClassVar[int] = 1
    num_convs: ClassVar[int] = 2
    kind: ClassVar[str] = "basic"

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64 (as torchvision)")
        if downsample is not None and not residual:
            raise ValueError("a plain block (residual=False) has no shortcut to downsample")
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (N, C_in, H, W)
        out = self.conv1(x)  # (N, C, H/s, W/s)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)  # (N, C, H/s, W/s)
        out = self.bn2(out)
        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)  # (N, C, H/s, W/s), option A/B/C of section 3.3
            out += identity  # y = F(x) + x, eq. (1)/(2)
        out = self.relu(out)  # the second nonlinearity comes after the addition (Fig. 2)
        return out

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 restore (paper Fig. 5 right, section 4.1 "Deeper Bottleneck Architectures").

    The stride is on the 3x3 conv (torchvision "v1.5"; the paper puts it on the first 1x1).  ``groups`` and
    ``base_width`` give ResNeXt (Xie et al. 2017, Fig. 3(c)) and wide ResNets (Zagoruyko & Komodakis 2016).
    """

    expansion: ClassVar[int] = 4
    num_convs: ClassVar[int] = 3
    kind: ClassVar[str] = "bottleneck"

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        residual: bool = True,
    ) -> None:
        super().__init__()
        if downsample is not None and not residual:
            raise ValueError("a plain block (residual=False) has no shortcut to downsample")
        width = int(channels * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, channels * self.expansion)
        self.bn3 = nn.BatchNorm2d(channels * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (N, C_in, H, W)
        out = self.conv1(x)  # (N, width, H, W)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)  # (N, width, H/s, W/s)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)  # (N, 4C, H/s, W/s)
        out = self.bn3(out)
        if self.residual:
            if self.downsample is not None:
                identity = self.downsample(x)  # (N, 4C, H/s, W/s), option A/B/C of section 3.3
            out += identity  # y = F(x) + x, eq. (1)/(2)
        out = self.relu(out)
        return out

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3


BlockType = type[BasicBlock] | type[Bottleneck]


def make_stage(
    block: type[ResidualBlock],
    in_channels: int,
    channels: int,
    num_blocks: int,
    stride: int,
    shortcut: ShortcutOption | None,
    *,
    first_block: dict[str, Any] | None = None,
    **block_kwargs: Any,
) -> nn.Sequential:
    """One stage (``layerK``): the first block changes stride/width, the rest keep the shape.

    ``shortcut=None`` gives blocks without a shortcut (the plain networks of paper section 4.1).
    ``block_kwargs`` go to every block, ``first_block`` (updating them) to the first one only.
    """
    blocks: list[nn.Module] = []
    out_channels = channels * block.expansion
    for index in range(num_blocks):
        block_in = in_channels if index == 0 else out_channels
        block_stride = stride if index == 0 else 1
        downsample = None if shortcut is None else make_shortcut(shortcut, block_in, out_channels, block_stride)
        kwargs = {**block_kwargs, **(first_block or {})} if index == 0 else block_kwargs
        blocks.append(block(block_in, channels, block_stride, downsample, **kwargs))
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """ResNet / plain network of paper Table 1 (``stem="imagenet"``) or section 4.2 (``stem="cifar"``).

    ``widths`` are the per-stage ``channels`` (64/128/256/512 for ImageNet, 16/32/64 for CIFAR); each stage
    after the first halves the feature map with a stride-2 first block.  ``shortcut`` is option A/B/C of
    section 3.3, or ``None`` for the plain baseline.  The stem, the stages and the head are shared by every
    variant: the pre-activation networks (``preact.py``) override only the blocks' arguments and what
    happens between the last stage and the pooling (``_block_kwargs``, ``_add_pre_pool``, ``_pre_pool``).
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Stem = "imagenet",
        num_classes: int = 1000,
        shortcut: ShortcutOption | None = "B",
        groups: int = 1,
        width_per_group: int = 64,
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"need one width per stage, got layers={tuple(layers)} widths={tuple(widths)}")
        if zero_init_residual and shortcut is None:
            raise ValueError("zero_init_residual would zero every block of a plain network (no shortcut)")
        self.checkpoint_activations = checkpoint_activations
        stem_channels = widths[0]
        if stem == "imagenet":
            # conv1 of Table 1: 7x7, stride 2, then a 3x3 stride-2 max pool.
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
            # Section 4.2: "The first layer is 3x3 convolutions"; 32x32 inputs are not pooled.
            self.conv1 = conv3x3(3, stem_channels)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        )
        self.stage_names: tuple[str, ...] = tuple(f"layer{k}" for k in range(1, len(layers) + 1))
        in_channels = stem_channels
        for index, (name, num_blocks, channels) in enumerate(
            zip(self.stage_names, layers, widths, strict=True)
        ):
            every, first = self._block_kwargs(index, shortcut, groups=groups, base_width=width_per_group)
            stage = make_stage(
                block, in_channels, channels, num_blocks, 1 if index == 0 else 2, shortcut, first_block=first,
                **every,
            )
            self.add_module(name, stage)
            in_channels = channels * block.expansion
        self._add_pre_pool(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self, zero_init_residual)

    def _block_kwargs(
        self, stage_index: int, shortcut: ShortcutOption | None, *, groups: int, base_width: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keyword arguments for every block of stage ``stage_index``, and the overrides of its first block."""
        return {"groups": groups, "base_width": base_width, "residual": shortcut is not None}, {}

    def _add_pre_pool(self, channels: int) -> None:
        """Modules between the last stage and the pooling: none in the v1 networks."""

    def _pre_pool(self, x: Tensor) -> Tensor:
        return x

    def stages(self) -> tuple[nn.Sequential, ...]:
        """The stages ``layer1``, ``layer2``... in order."""
        return tuple(self.get_submodule(name) for name in self.stage_names)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (N, C0, H/2, W/2) ImageNet stem; (N, C0, H, W) CIFAR stem
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)  # (N, C0, H/4, W/4); identity for CIFAR
        for stage in self.stages():
            x = run_stage(stage, x, self.checkpoint_activations)  # stage k > 1 halves H and W
        x = self._pre_pool(x)
        x = self.avgpool(x)  # (N, C_last, 1, 1)
        x = torch.flatten(x, 1)  # (N, C_last)
        x = self.dropout(x)
        x = self.fc(x)  # (N, num_classes)
        return x


# Keyword arguments (and defaults) of every builder: the head's, and the shortcut's where there is one.
HEAD_OPTIONS: dict[str, Any] = {"dropout": 0.0, "checkpoint_activations": False}
RESIDUAL_OPTIONS: dict[str, Any] = {"shortcut": "B", "zero_init_residual": False}


def _imagenet(
    name: str, block: BlockType, layers: tuple[int, ...], *, reference_params: int | None, source: str,
    groups: int = 1, width_per_group: int = 64,
) -> Callable[..., nn.Module]:
    """A residual ImageNet network; shortcut option B by default (torchvision, paper Table 3)."""
    return register_builder(
        name,
        functools.partial(ResNet, block, layers, groups=groups, width_per_group=width_per_group),
        options={"num_classes": 1000, **RESIDUAL_OPTIONS, **HEAD_OPTIONS},
        doc=f"{name} ({source}); torchvision-compatible state_dict.",
        layers=block.num_convs * sum(layers) + 2, family="imagenet", block=block.kind, source=source,
        reference_params=reference_params,
    )


def _plain(name: str, block: BlockType, layers: tuple[int, ...]) -> Callable[..., nn.Module]:
    """A plain ImageNet network: the ResNet layout without shortcuts (paper section 4.1, Table 2)."""
    return register_builder(
        name,
        functools.partial(ResNet, block, layers, shortcut=None),
        options={"num_classes": 1000, **HEAD_OPTIONS},
        doc=f"{name}: plain network without shortcuts ({_PAPER}, section 4.1, Table 2).",
        layers=block.num_convs * sum(layers) + 2, family="imagenet", block=block.kind,
        source=f"{_PAPER}, section 4.1, Table 2",
    )


# Reference parameter counts are torchvision's (1000 classes), which these models reproduce exactly.
resnet18 = _imagenet(
    "resnet18", BasicBlock, (2, 2, 2, 2), reference_params=11_689_512, source=f"{_PAPER}, Table 1"
)
resnet34 = _imagenet(
    "resnet34", BasicBlock, (3, 4, 6, 3), reference_params=21_797_672, source=f"{_PAPER}, Table 1"
)
resnet50 = _imagenet(
    "resnet50", Bottleneck, (3, 4, 6, 3), reference_params=25_557_032, source=f"{_PAPER}, Table 1"
)
resnet101 = _imagenet(
    "resnet101", Bottleneck, (3, 4, 23, 3), reference_params=44_549_160, source=f"{_PAPER}, Table 1"
)
resnet152 = _imagenet(
    "resnet152", Bottleneck, (3, 8, 36, 3), reference_params=60_192_808, source=f"{_PAPER}, Table 1"
)
wide_resnet50_2 = _imagenet(
    "wide_resnet50_2",
    Bottleneck,
    (3, 4, 6, 3),
    reference_params=68_883_240,
    source="Zagoruyko & Komodakis 2016, arXiv:1605.07146 (bottleneck width x2, torchvision layout)",
    width_per_group=128,
)
wide_resnet101_2 = _imagenet(
    "wide_resnet101_2",
    Bottleneck,
    (3, 4, 23, 3),
    reference_params=126_886_696,
    source="Zagoruyko & Komodakis 2016, arXiv:1605.07146 (bottleneck width x2, torchvision layout)",
    width_per_group=128,
)
resnext50_32x4d = _imagenet(
    "resnext50_32x4d",
    Bottleneck,
    (3, 4, 6, 3),
    reference_params=25_028_904,
    source="Xie et al. 2017, arXiv:1611.05431, Table 1",
    groups=32,
    width_per_group=4,
)
resnext101_32x8d = _imagenet(
    "resnext101_32x8d",
    Bottleneck,
    (3, 4, 23, 3),
    reference_params=88_791_336,
    source="Xie et al. 2017, arXiv:1611.05431",
    groups=32,
    width_per_group=8,
)
resnext101_64x4d = _imagenet(
    "resnext101_64x4d",
    Bottleneck,
    (3, 4, 23, 3),
    reference_params=83_455_272,
    source="Xie et al. 2017, arXiv:1611.05431",
    groups=64,
    width_per_group=4,
)

plain18 = _plain("plain18", BasicBlock, (2, 2, 2, 2))
plain34 = _plain("plain34", BasicBlock, (3, 4, 6, 3))
plain50 = _plain("plain50", Bottleneck, (3, 4, 6, 3))
