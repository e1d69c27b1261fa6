"""The CIFAR-10 networks of He et al. 2015, section 4.2 (arXiv:1512.03385).

"The first layer is 3x3 convolutions. Then we use a stack of 6n layers with 3x3 convolutions on the feature
maps of sizes {32, 16, 8} respectively, with 2n layers for each feature map size. The numbers of filters are
{16, 32, 64} respectively. [...] The network ends with a global average pooling, a 10-way fully-connected
layer, and softmax. There are totally 6n+2 stacked weighted layers." Shortcuts are option A ("we use
identity shortcuts in all cases"), so the residual and plain networks have the same parameters.
Parameter counts (10 classes): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M (paper Table 6).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from pipeline.models.registry import register_builder
from pipeline.models.resnet import HEAD_OPTIONS, RESIDUAL_OPTIONS, BasicBlock, ResNet

CIFAR_WIDTHS: tuple[int, int, int] = (16, 32, 64)

_SOURCE = "He et al. 2015, arXiv:1512.03385, section 4.2, Table 6"


def _blocks_per_stage(depth: int) -> int:
    """n in depth = 6n + 2 (section 4.2)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6


def _cifar(depth: int, paper_params_m: float | None, *, plain: bool = False) -> Callable[..., nn.Module]:
    """ResNet-``depth`` (option A shortcuts by default) or, with ``plain``, the same network without them."""
    n = _blocks_per_stage(depth)
    make = functools.partial(ResNet, BasicBlock, (n, n, n), widths=CIFAR_WIDTHS, stem="cifar")
    if plain:
        name, options = f"plain{depth}", {"num_classes": 10, **HEAD_OPTIONS}
        make = functools.partial(make, shortcut=None)
        doc = f"Plain-{depth} for CIFAR ({_SOURCE}, Fig. 6 left): the ResNet without shortcuts."
    else:
        name, options = f"resnet{depth}", {"num_classes": 10, **RESIDUAL_OPTIONS, "shortcut": "A", **HEAD_OPTIONS}
        doc = f"ResNet-{depth} for 32x32 CIFAR images ({_SOURCE}); option A shortcuts by default."
    return register_builder(
        name, make, options=options, doc=doc, layers=depth, family="cifar", block="basic", source=_SOURCE,
        paper_params_m=paper_params_m,
    )


resnet20 = _cifar(20, 0.27)
resnet32 = _cifar(32, 0.46)
resnet44 = _cifar(44, 0.66)
resnet56 = _cifar(56, 0.85)
resnet110 = _cifar(110, 1.7)
resnet1202 = _cifar(1202, 19.4)

plain20 = _cifar(20, 0.27, plain=True)
plain32 = _cifar(32, 0.46, plain=True)
plain44 = _cifar(44, 0.66, plain=True)
plain56 = _cifar(56, 0.85, plain=True)
plain110 = _cifar(110, 1.7, plain=True)
