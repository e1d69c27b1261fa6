"""What the pipeline knows about each network without building it: name -> (family, block, layers).

Validating params (every stage does) and the tuning transfer rule need only these facts; importing
pipeline.models for them would load torch and every builder, and would make each stage's DVC deps (the code it
imports) include the model code, so that editing a model reran data preparation. tests/test_models.py keeps this
table equal to the model registry's `model_info`.
"""

from __future__ import annotations

# family: "imagenet" | "cifar"; block: "basic" | "bottleneck" | "preact_basic" | "preact_bottleneck";
# layers: weighted layers as the paper counts them.
ARCHS: dict[str, tuple[str, str, int]] = {
    "plain110": ("cifar", "basic", 110),
    "plain18": ("imagenet", "basic", 18),
    "plain20": ("cifar", "basic", 20),
    "plain32": ("cifar", "basic", 32),
    "plain34": ("imagenet", "basic", 34),
    "plain44": ("cifar", "basic", 44),
    "plain50": ("imagenet", "bottleneck", 50),
    "plain56": ("cifar", "basic", 56),
    "preact_resnet101": ("imagenet", "preact_bottleneck", 101),
    "preact_resnet110": ("cifar", "preact_basic", 110),
    "preact_resnet152": ("imagenet", "preact_bottleneck", 152),
    "preact_resnet164": ("cifar", "preact_bottleneck", 164),
    "preact_resnet18": ("imagenet", "preact_basic", 18),
    "preact_resnet34": ("imagenet", "preact_basic", 34),
    "preact_resnet50": ("imagenet", "preact_bottleneck", 50),
    "resnet101": ("imagenet", "bottleneck", 101),
    "resnet110": ("cifar", "basic", 110),
    "resnet1202": ("cifar", "basic", 1202),
    "resnet152": ("imagenet", "bottleneck", 152),
    "resnet18": ("imagenet", "basic", 18),
    "resnet20": ("cifar", "basic", 20),
    "resnet32": ("cifar", "basic", 32),
    "resnet34": ("imagenet", "basic", 34),
    "resnet44": ("cifar", "basic", 44),
    "resnet50": ("imagenet", "bottleneck", 50),
    "resnet56": ("cifar", "basic", 56),
    "resnext101_32x8d": ("imagenet", "bottleneck", 101),
    "resnext101_64x4d": ("imagenet", "bottleneck", 101),
    "resnext50_32x4d": ("imagenet", "bottleneck", 50),
    "wide_resnet101_2": ("imagenet", "bottleneck", 101),
    "wide_resnet50_2": ("imagenet", "bottleneck", 50),
}


def network_kind(arch: str) -> tuple[str, str]:
    """(family, block) of a network: what the lr transfer rule matches on. Nets of one kind share their block
    design and normalisation layout, so the best rate moves little with depth inside a kind (He et al. train
    ResNet-18..152 at one rate), while basic and bottleneck blocks differ in depth per block and in how the
    residual branch's variance grows."""
    family, block, _ = ARCHS[arch]
    return family, block


def lr_source_arch(arch: str, tuned: list[str] | tuple[str, ...]) -> str | None:
    """The tuned arch whose lr `arch` uses: itself when tuned, else the tuned arch of its kind nearest in depth
    (the shallower on a tie: fewer layers, the cheaper and less noisy search); None when no tuned arch has its
    kind."""
    if arch in tuned:
        return arch
    kind, layers = network_kind(arch), ARCHS[arch][2]
    same = [t for t in tuned if network_kind(t) == kind]
    if not same:
        return None
    return min(same, key=lambda t: (abs(ARCHS[t][2] - layers), ARCHS[t][2], t))
