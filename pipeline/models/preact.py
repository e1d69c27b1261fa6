"""Pre-activation ResNets of He et al. 2016, "Identity Mappings in Deep Residual Networks" (arXiv:1603.05027).

Each residual unit is BN -> ReLU -> conv (Fig. 4(e), "full pre-activation"): nothing follows the addition,
so the shortcut path is a pure identity from unit to unit (eq. (4)).  The two ends of the network follow the
paper's discussion of Fig. 5: the first unit's activation sits right after conv1, before the split into the
two paths, and the last unit gets an extra activation after its addition.  Hence the stem is
conv1 -> bn1 -> relu, the first unit skips its own pre-activation, and ``final_bn`` -> relu precede the
pooling.  A unit whose shortcut projects (or zero-pads) applies it to the pre-activated input, shared by both
paths (our reading of the authors' released Torch code for stage transitions).  Module names follow the v1
ResNets where the roles match; there is no torchvision counterpart to load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

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
from pipeline.models.registry import register_model
from pipeline.models.resnet import Stem, check_head_arguments

_PAPER = "He et al. 2016, arXiv:1603.05027"


class PreActBasicBlock(ResidualBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut (Fig. 1(b), Fig. 4(e))."""

    expansion: ClassVar[int] = 1
    num_convs: ClassVar[int] = 2
    kind: ClassVar[str] = "preact_basic"

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        preactivate: bool = True,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and base_width=64")
        self.bn1: nn.BatchNorm2d | None = nn.BatchNorm2d(in_channels) if preactivate else None
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = conv3x3(channels, channels)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = x  # (N, C_in, H, W); already activated by the stem when bn1 is None
        if self.bn1 is not None:
            out = self.bn1(x)  # pre-activation, Fig. 4(e)
            out = self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(out)  # (N, C, H/s, W/s)
        out = self.conv1(out)  # (N, C, H/s, W/s)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)  # (N, C, H/s, W/s)
        out += shortcut  # x_{l+1} = x_l + F(x_l), eq. (4): no activation after the addition
        return out

    def last_norm(self) -> nn.BatchNorm2d:
        # Zeroing the BN before the last conv makes the residual branch output exactly 0 (convs have no bias).
        return self.bn2


class PreActBottleneck(ResidualBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride here), BN-ReLU-conv1x1 plus the shortcut."""

    expansion: ClassVar[int] = 4
    num_convs: ClassVar[int] = 3
    kind: ClassVar[str] = "preact_bottleneck"

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        groups: int = 1,
        base_width: int = 64,
        preactivate: bool = True,
    ) -> None:
        super().__init__()
        width = int(channels * (base_width / 64.0)) * groups
        self.bn1: nn.BatchNorm2d | None = nn.BatchNorm2d(in_channels) if preactivate else None
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, channels * self.expansion)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = x  # (N, C_in, H, W); already activated by the stem when bn1 is None
        if self.bn1 is not None:
            out = self.bn1(x)  # pre-activation, Fig. 4(e)
            out = self.relu(out)
        shortcut = x if self.downsample is None else self.downsample(out)  # (N, 4C, H/s, W/s)
        out = self.conv1(out)  # (N, width, H, W)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)  # (N, width, H/s, W/s)
        out = self.bn3(out)
        out = self.relu(out)
        out = self.conv3(out)  # (N, 4C, H/s, W/s)
        out += shortcut  # eq. (4)
        return out

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3


PreActBlockType = type[PreActBasicBlock] | type[PreActBottleneck]


class PreActResNet(nn.Module):
    """Pre-activation ResNet; ImageNet or CIFAR stem and stages as He et al. 2015 (Table 1, section 4.2)."""

    def __init__(
        self,
        block: PreActBlockType,
        layers: Sequence[int],
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Stem = "imagenet",
        num_classes: int = 1000,
        shortcut: ShortcutOption = "B",
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
    ) -> None:
        super().__init__()
        check_head_arguments(num_classes, dropout)
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"need one width per stage, got layers={tuple(layers)} widths={tuple(widths)}")
        self.checkpoint_activations = checkpoint_activations
        stem_channels = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)
        elif stem == "cifar":
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
            out_channels = channels * block.expansion
            blocks: list[nn.Module] = []
            for position in range(num_blocks):
                block_in = in_channels if position == 0 else out_channels
                stride = 2 if index > 0 and position == 0 else 1
                blocks.append(
                    block(
                        block_in,
                        channels,
                        stride,
                        make_shortcut(shortcut, block_in, out_channels, stride),
                        preactivate=not (index == 0 and position == 0),  # the stem activated it
                    )
                )
            self.add_module(name, nn.Sequential(*blocks))
            in_channels = out_channels
        self.final_bn = nn.BatchNorm2d(in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_channels, num_classes)
        init_weights(self, zero_init_residual)

    def stages(self) -> tuple[nn.Sequential, ...]:
        """The stages ``layer1``, ``layer2``... in order."""
        return tuple(self.get_submodule(name) for name in self.stage_names)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (N, C0, H/2, W/2) ImageNet stem; (N, C0, H, W) CIFAR stem
        x = self.bn1(x)  # the first activation, before the first unit splits (discussion of Fig. 5)
        x = self.relu(x)
        x = self.maxpool(x)  # (N, C0, H/4, W/4); identity for CIFAR
        for stage in self.stages():
            x = run_stage(stage, x, self.checkpoint_activations)  # stage k > 1 halves H and W
        x = self.final_bn(x)  # the extra activation after the last addition (discussion of Fig. 5)
        x = self.relu(x)
        x = self.avgpool(x)  # (N, C_last, 1, 1)
        x = torch.flatten(x, 1)  # (N, C_last)
        x = self.dropout(x)
        x = self.fc(x)  # (N, num_classes)
        return x


def _register_preact(
    name: str,
    block: PreActBlockType,
    layers: tuple[int, ...],
    *,
    stem: Stem,
    paper_params_m: float | None = None,
) -> Callable[..., PreActResNet]:
    widths = (64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64)
    default_classes = 1000 if stem == "imagenet" else 10

    def builder(
        *,
        num_classes: int = default_classes,
        shortcut: ShortcutOption = "B",
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
    ) -> PreActResNet:
        return PreActResNet(
            block,
            layers,
            widths=widths,
            stem=stem,
            num_classes=num_classes,
            shortcut=shortcut,
            zero_init_residual=zero_init_residual,
            dropout=dropout,
            checkpoint_activations=checkpoint_activations,
        )

    source = f"{_PAPER}, Fig. 4(e), {'CIFAR' if stem == 'cifar' else 'ImageNet'} layout"
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = (
        f"{name}: full pre-activation ResNet ({source}); projection shortcuts (option B) by default."
    )
    return register_model(
        name,
        layers=block.num_convs * sum(layers) + 2,
        family=stem,
        block=block.kind,
        source=source,
        paper_params_m=paper_params_m,
    )(builder)


preact_resnet18 = _register_preact("preact_resnet18", PreActBasicBlock, (2, 2, 2, 2), stem="imagenet")
preact_resnet34 = _register_preact("preact_resnet34", PreActBasicBlock, (3, 4, 6, 3), stem="imagenet")
preact_resnet50 = _register_preact("preact_resnet50", PreActBottleneck, (3, 4, 6, 3), stem="imagenet")
preact_resnet101 = _register_preact("preact_resnet101", PreActBottleneck, (3, 4, 23, 3), stem="imagenet")
preact_resnet152 = _register_preact("preact_resnet152", PreActBottleneck, (3, 8, 36, 3), stem="imagenet")
# The paper's CIFAR-10 models: ResNet-110 (basic units, 1.7M) and ResNet-164 (bottleneck units, 1.7M).
preact_resnet110 = _register_preact(
    "preact_resnet110", PreActBasicBlock, (18, 18, 18), stem="cifar", paper_params_m=1.7
)
preact_resnet164 = _register_preact(
    "preact_resnet164", PreActBottleneck, (18, 18, 18), stem="cifar", paper_params_m=1.7
)
