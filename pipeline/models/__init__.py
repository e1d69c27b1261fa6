"""The ResNet family and its registry.

>>> from pipeline.models import MODELS, build_model, model_info
>>> model = build_model("resnet50", num_classes=1000)          # torchvision-compatible state_dict
>>> cifar = build_model("resnet56", num_classes=10)            # He et al. 2015, section 4.2
>>> model_info("resnet50")["reference_params"]
25557032

Names: ImageNet ResNets (resnet18/34/50/101/152, wide_resnet50_2/101_2, resnext50_32x4d, resnext101_32x8d,
resnext101_64x4d), their plain counterparts (plain18/34/50), the CIFAR networks (resnet20/32/44/56/110/1202,
plain20/32/44/56/110) and the pre-activation ResNets (preact_resnet18/34/50/101/152, preact_resnet110/164).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.models import cifar, preact, resnet  # noqa: F401  (imported for their registrations)
from pipeline.models.layers import SHORTCUT_OPTIONS, ResidualBlock, ShortcutOption, ZeroPadShortcut
from pipeline.models.preact import PreActBasicBlock, PreActBottleneck, PreActResNet
from pipeline.models.registry import (
    INPUT_SIZE,
    REGISTRY,
    ModelRegistry,
    ModelSpec,
    count_params,
    register_model,
)
from pipeline.models.resnet import BasicBlock, Bottleneck, ResNet

# The built-in names, sorted; ``list_models()`` also sees models registered later.
MODELS: tuple[str, ...] = REGISTRY.names()


def list_models() -> tuple[str, ...]:
    """Every registered name, sorted, including models registered after import."""
    return REGISTRY.names()


def build_model(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` with a ``num_classes``-way classifier.

    ``kwargs`` go to the builder (``shortcut``, ``zero_init_residual``, ``dropout``,
    ``checkpoint_activations`` where the model has them); an unknown keyword raises ``TypeError`` naming
    it, an unknown model name ``ValueError`` listing the valid ones.  Weights are freshly initialised
    (He init, paper section 3.4).
    """
    return REGISTRY.build(name, num_classes=num_classes, **kwargs)


def model_info(name: str) -> dict[str, Any]:
    """What is known about ``name`` without building it.

    Keys: ``name``, ``layers`` (weighted layers as the paper counts them), ``family`` ("imagenet" | "cifar"),
    ``block``, ``reference_params`` (exact published count with 1000 classes, torchvision's; ``None`` if
    there is none), ``paper_params_m`` (the count the paper prints, in millions, CIFAR only), ``input_size``,
    ``source`` and ``defaults`` (the builder's keyword arguments and their defaults).
    """
    spec = REGISTRY.spec(name)
    return {
        "name": spec.name,
        "layers": spec.layers,
        "family": spec.family,
        "block": spec.block,
        "reference_params": spec.reference_params,
        "paper_params_m": spec.paper_params_m,
        "input_size": INPUT_SIZE[spec.family],
        "source": spec.source,
        "defaults": spec.defaults(),
    }


__all__ = [
    "INPUT_SIZE",
    "MODELS",
    "REGISTRY",
    "SHORTCUT_OPTIONS",
    "BasicBlock",
    "Bottleneck",
    "ModelRegistry",
    "ModelSpec",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "ResNet",
    "ResidualBlock",
    "ShortcutOption",
    "ZeroPadShortcut",
    "build_model",
    "count_params",
    "list_models",
    "model_info",
    "register_model",
]
