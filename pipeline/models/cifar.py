"""The CIFAR-10 networks of He et al. 2015, section 4.2 (arXiv:1512.03385).

"The first layer is 3x3 convolutions. Then we use a stack of 6n layers with 3x3 convolutions on the feature
maps of sizes {32, 16, 8} respectively, with 2n layers for each feature map size. The numbers of filters are
{16, 32, 64} respectively. [...] The network ends with a global average pooling, a 10-way fully-connected
layer, and softmax. There are totally 6n+2 stacked weighted layers." Shortcuts are option A ("we use
identity shortcuts in all cases"), so the residual and plain networks have the same parameters.
Parameter counts (10 classes): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M (paper Table 6).
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.models.layers import ShortcutOption
from pipeline.models.registry import register_model
from pipeline.models.resnet import BasicBlock, ResNet

CIFAR_WIDTHS: tuple[int, int, int] = (16, 32, 64)

_SOURCE = "He et al. 2015, arXiv:1512.03385, section 4.2, Table 6"


def _blocks_per_stage(depth: int) -> int:
    """n in depth = 6n + 2 (section 4.2)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    return (depth - 2) // 6


def _register_cifar(depth: int, paper_params_m: float | None) -> Callable[..., ResNet]:
    name = f"resnet{depth}"
    n = _blocks_per_stage(depth)

    def builder(
        *,
        num_classes: int = 10,
        shortcut: ShortcutOption = "A",
        zero_init_residual: bool = False,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
    ) -> ResNet:
        return ResNet(
            BasicBlock,
            (n, n, n),
            widths=CIFAR_WIDTHS,
            stem="cifar",
            num_classes=num_classes,
            shortcut=shortcut,
            zero_init_residual=zero_init_residual,
            dropout=dropout,
            checkpoint_activations=checkpoint_activations,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"ResNet-{depth} for 32x32 CIFAR images ({_SOURCE}); option A shortcuts by default."
    return register_model(
        name, layers=depth, family="cifar", block="basic", source=_SOURCE, paper_params_m=paper_params_m
    )(builder)


def _register_cifar_plain(depth: int, paper_params_m: float | None) -> Callable[..., ResNet]:
    name = f"plain{depth}"
    n = _blocks_per_stage(depth)

    def builder(
        *,
        num_classes: int = 10,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
    ) -> ResNet:
        return ResNet(
            BasicBlock,
            (n, n, n),
            widths=CIFAR_WIDTHS,
            stem="cifar",
            num_classes=num_classes,
            shortcut=None,
            dropout=dropout,
            checkpoint_activations=checkpoint_activations,
        )

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"Plain-{depth} for CIFAR ({_SOURCE}, Fig. 6 left): the ResNet without shortcuts."
    return register_model(
        name, layers=depth, family="cifar", block="basic", source=_SOURCE, paper_params_m=paper_params_m
    )(builder)


resnet20 = _register_cifar(20, 0.27)
resnet32 = _register_cifar(32, 0.46)
resnet44 = _register_cifar(44, 0.66)
resnet56 = _register_cifar(56, 0.85)
resnet110 = _register_cifar(110, 1.7)
resnet1202 = _register_cifar(1202, 19.4)

plain20 = _register_cifar_plain(20, 0.27)
plain32 = _register_cifar_plain(32, 0.46)
plain44 = _register_cifar_plain(44, 0.66)
plain56 = _register_cifar_plain(56, 0.85)
plain110 = _register_cifar_plain(110, 1.7)
