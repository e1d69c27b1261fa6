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

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from pipeline.models.layers import ResidualBlock, ShortcutOption, conv1x1, conv3x3
from pipeline.models.registry import register_builder
from pipeline.models.resnet import HEAD_OPTIONS, RESIDUAL_OPTIONS, ResNet, Stem

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


class PreActResNet(ResNet):
    """Pre-activation ResNet: the stem, stages and head of ``ResNet`` (He et al. 2015, Table 1 / section 4.2)
    with full pre-activation units; only the blocks' arguments and the activation before the pooling differ."""

    def __init__(self, block: PreActBlockType, layers: Sequence[int], **kwargs: Any) -> None:
        if kwargs.get("shortcut", "B") is None:
            raise ValueError("a pre-activation network needs a shortcut option (A, B or C)")
        super().__init__(block, layers, **kwargs)

    def _block_kwargs(
        self, stage_index: int, shortcut: ShortcutOption | None, *, groups: int, base_width: int
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # The stem's bn1 + relu already activated the first unit's input (discussion of Fig. 5).
        return {"groups": groups, "base_width": base_width}, {"preactivate": stage_index != 0}

    def _add_pre_pool(self, channels: int) -> None:
        self.final_bn = nn.BatchNorm2d(channels)

    def _pre_pool(self, x: Tensor) -> Tensor:
        # The extra activation after the last addition (discussion of Fig. 5).
        return self.relu(self.final_bn(x))


def _preact(
    name: str, block: PreActBlockType, layers: tuple[int, ...], *, stem: Stem, paper_params_m: float | None = None
) -> Callable[..., nn.Module]:
    widths = (64, 128, 256, 512) if stem == "imagenet" else (16, 32, 64)
    source = f"{_PAPER}, Fig. 4(e), {'CIFAR' if stem == 'cifar' else 'ImageNet'} layout"
    return register_builder(
        name,
        functools.partial(PreActResNet, block, layers, widths=widths, stem=stem),
        options={"num_classes": 1000 if stem == "imagenet" else 10, **RESIDUAL_OPTIONS, **HEAD_OPTIONS},
        doc=f"{name}: full pre-activation ResNet ({source}); projection shortcuts (option B) by default.",
        layers=block.num_convs * sum(layers) + 2, family=stem, block=block.kind, source=source,
        paper_params_m=paper_params_m,
    )


preact_resnet18 = _preact("preact_resnet18", PreActBasicBlock, (2, 2, 2, 2), stem="imagenet")
preact_resnet34 = _preact("preact_resnet34", PreActBasicBlock, (3, 4, 6, 3), stem="imagenet")
preact_resnet50 = _preact("preact_resnet50", PreActBottleneck, (3, 4, 6, 3), stem="imagenet")
preact_resnet101 = _preact("preact_resnet101", PreActBottleneck, (3, 4, 23, 3), stem="imagenet")
preact_resnet152 = _preact("preact_resnet152", PreActBottleneck, (3, 8, 36, 3), stem="imagenet")
# The paper's CIFAR-10 models: ResNet-110 (basic units, 1.7M) and ResNet-164 (bottleneck units, 1.7M).
preact_resnet110 = _preact(
    "preact_resnet110", PreActBasicBlock, (18, 18, 18), stem="cifar", paper_params_m=1.7
)
preact_resnet164 = _preact(
    "preact_resnet164", PreActBottleneck, (18, 18, 18), stem="cifar", paper_params_m=1.7
)
