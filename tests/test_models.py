"""Tests for pipeline.models: torchvision equivalence, shortcut options, plain/CIFAR/pre-act nets, registry.

Everything runs on CPU at small resolutions (64 px for ImageNet layouts, 32 px for CIFAR) with batch 2.
torchvision is used only as an oracle here; the library never imports ``torchvision.models``.
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn

from pipeline.models import (
    MODELS,
    BasicBlock,
    Bottleneck,
    ModelRegistry,
    PreActBasicBlock,
    PreActBottleneck,
    PreActResNet,
    ResidualBlock,
    ResNet,
    ZeroPadShortcut,
    build_model,
    count_params,
    list_models,
    model_info,
)
from pipeline.models import registry as registry_module

IMAGENET_SIZE = 64  # 224 is too slow on CPU for the deep models; every layer still sees a >= 2x2 map
CIFAR_SIZE = 32

# torchvision's published counts (1000 classes), https://pytorch.org/vision/stable/models.html
REFERENCE_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "wide_resnet50_2": 68_883_240,
    "resnext50_32x4d": 25_028_904,
}
# He et al. 2015, Table 6 (10 classes).
CIFAR_PAPER_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "resnet1202": 19.4e6,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads ran these ~5x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _blocks(model: nn.Module) -> Iterator[ResidualBlock]:
    for module in model.modules():
        if isinstance(module, ResidualBlock):
            yield module


def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BN distinct affine parameters and running statistics, so a swapped layer shows up."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                shape = module.weight.shape
                module.weight.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) * 0.5 + 0.75)


def _input(size: int, seed: int = 0, batch: int = 2, channels: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


# --- torchvision equivalence (a fixed interface: torchvision's keys and outputs) --------------------------------------


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if "wide" in n or "101" in n or "152" in n else n
             for n in sorted(REFERENCE_PARAMS)]
)
def test_loads_torchvision_state_dict_and_gives_same_logits(name: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    _randomize_norms(reference, torch.Generator().manual_seed(1))
    ours = build_model(name).eval()

    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = _input(IMAGENET_SIZE)
    with torch.no_grad():
        expected = reference(x)
        actual = ours(x)

    assert actual.shape == (2, 1000)
    assert expected.abs().max() > 1e-2  # the comparison is not between two vectors of zeros
    assert (actual - expected).abs().max().item() <= 1e-5
    assert count_params(ours) == REFERENCE_PARAMS[name] == count_params(reference)
    assert model_info(name)["reference_params"] == REFERENCE_PARAMS[name]


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"])
def test_larger_variants_match_reference_param_counts(name: str) -> None:
    # Building torchvision's copies too would double the time; the count and the layout suffice here.
    model = build_model(name)
    assert count_params(model) == model_info(name)["reference_params"]


# --- shortcut options, paper section 3.3 --------------------------------------------------------------------


def test_zero_pad_shortcut_subsamples_and_pads_with_zeros() -> None:
    shortcut = ZeroPadShortcut(4, 8, stride=2)
    x = _input(7, channels=4)  # (2, 4, 7, 7)
    y = shortcut(x)
    assert y.shape == (2, 8, 4, 4)  # ceil(7 / 2), as a stride-2 conv with padding 1
    assert torch.equal(y[:, :4], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 4:]) == 0
    assert count_params(shortcut) == 0


def test_option_a_is_parameter_free_and_smaller_than_b() -> None:
    option_a = build_model("resnet34", shortcut="A")
    option_b = build_model("resnet34", shortcut="B")
    downsamples = [block.downsample for block in _blocks(option_a) if block.downsample is not None]
    assert len(downsamples) == 3  # first block of layer2, layer3, layer4
    assert all(isinstance(module, ZeroPadShortcut) for module in downsamples)
    assert not any("downsample" in key for key in option_a.state_dict())
    projection_params = sum(p.numel() for key, p in option_b.named_parameters() if "downsample" in key)
    assert count_params(option_a) == count_params(option_b) - projection_params
    with torch.no_grad():
        assert option_a.eval()(_input(IMAGENET_SIZE)).shape == (2, 1000)


def test_option_a_on_bottleneck_pads_the_first_block() -> None:
    model = build_model("resnet50", shortcut="A", num_classes=5).eval()
    first = model.get_submodule("layer1.0")
    assert isinstance(first.downsample, ZeroPadShortcut)  # 64 -> 256 channels at stride 1
    with torch.no_grad():
        assert model(_input(IMAGENET_SIZE)).shape == (2, 5)


def test_option_c_projects_every_shortcut() -> None:
    model = build_model("resnet18", shortcut="C")
    blocks = list(_blocks(model))
    assert len(blocks) == 8
    for block in blocks:
        assert isinstance(block.downsample, nn.Sequential)
        assert isinstance(block.downsample[0], nn.Conv2d)
        assert block.downsample[0].kernel_size == (1, 1)
    assert count_params(model) > count_params(build_model("resnet18"))


def test_option_b_projects_only_where_the_shape_changes() -> None:
    model = build_model("resnet18")
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicBlock)]
    with_projection = [name for name, block in blocks if block.downsample is not None]
    assert with_projection == ["layer2.0", "layer3.0", "layer4.0"]


def test_unknown_shortcut_option_is_refused() -> None:
    with pytest.raises(ValueError, match="shortcut must be one of"):
        build_model("resnet18", shortcut="D")


# --- plain networks (paper section 4.1, Table 2) ------------------------------------------------------------


def test_plain18_is_resnet18_without_shortcuts() -> None:
    torch.manual_seed(0)
    residual = build_model("resnet18").eval()
    plain = build_model("plain18").eval()
    _randomize_norms(residual, torch.Generator().manual_seed(1))

    result = plain.load_state_dict(residual.state_dict(), strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys and all(".downsample." in key for key in result.unexpected_keys)
    projection_params = sum(p.numel() for key, p in residual.named_parameters() if "downsample" in key)
    assert count_params(plain) == count_params(residual) - projection_params
    assert all(not block.residual and block.downsample is None for block in _blocks(plain))

    # Same weights, same input to layer2.1 (an identity-shortcut block): the residual block adds its input.
    x = torch.relu(_input(8, channels=128))  # (2, 128, 8, 8), non-negative like a block output
    residual_block = residual.get_submodule("layer2.1")
    plain_block = plain.get_submodule("layer2.1")
    with torch.no_grad():
        branch = residual_block.bn2(
            residual_block.conv2(torch.relu(residual_block.bn1(residual_block.conv1(x))))
        )
        torch.testing.assert_close(plain_block(x), torch.relu(branch), rtol=0, atol=1e-6)
        torch.testing.assert_close(residual_block(x), torch.relu(branch + x), rtol=0, atol=1e-6)
        assert not torch.allclose(plain(_input(IMAGENET_SIZE)), residual(_input(IMAGENET_SIZE)))


def test_plain_builders_refuse_shortcut_arguments() -> None:
    with pytest.raises(TypeError, match=r"'shortcut'.*'zero_init_residual'"):
        build_model("plain34", shortcut="A", zero_init_residual=True)


# --- CIFAR networks (paper section 4.2, Table 6) ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CIFAR_PAPER_PARAMS))
def test_cifar_resnets_match_paper_table_6(name: str) -> None:
    model = build_model(name, num_classes=10)
    depth = int(name.removeprefix("resnet"))
    n = (depth - 2) // 6
    info = model_info(name)
    assert info["family"] == "cifar" and info["layers"] == depth and info["input_size"] == 32
    assert math.isclose(count_params(model), CIFAR_PAPER_PARAMS[name], rel_tol=0.02)
    assert isinstance(model, ResNet)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.stage_names == ("layer1", "layer2", "layer3")
    assert [len(stage) for stage in model.stages()] == [n, n, n]
    assert [stage[0].conv1.out_channels for stage in model.stages()] == [16, 32, 64]
    # Option A everywhere: "we use identity shortcuts in all cases" (section 4.2).
    assert not any("downsample" in key for key in model.state_dict())
    # A plain counterpart has exactly the same parameters.
    if depth <= 110:
        assert count_params(build_model(f"plain{depth}", num_classes=10)) == count_params(model)


def test_cifar_builder_defaults_to_ten_classes_and_handles_odd_sizes() -> None:
    model = build_model("resnet20", num_classes=10).eval()
    assert model_info("resnet20")["defaults"]["num_classes"] == 10
    with torch.no_grad():
        assert model(_input(CIFAR_SIZE)).shape == (2, 10)
        assert model(_input(33)).shape == (2, 10)  # zero-pad shortcut subsampling matches the strided conv


# --- pre-activation ResNets (He et al. 2016) ----------------------------------------------------------------


def test_preact_structure() -> None:
    model = build_model("preact_resnet50").eval()
    assert isinstance(model, PreActResNet)
    blocks = list(_blocks(model))
    assert all(isinstance(block, PreActBottleneck) for block in blocks)
    assert blocks[0].bn1 is None  # the stem's BN-ReLU is its pre-activation
    assert all(isinstance(block.bn1, nn.BatchNorm2d) for block in blocks[1:])
    assert isinstance(model.final_bn, nn.BatchNorm2d) and model.final_bn.num_features == 2048
    assert model_info("preact_resnet50")["layers"] == 50
    assert model_info("preact_resnet164")["layers"] == 164
    assert math.isclose(count_params(build_model("preact_resnet164", num_classes=10)), 1.7e6, rel_tol=0.02)
    assert math.isclose(count_params(build_model("preact_resnet110", num_classes=10)), 1.7e6, rel_tol=0.02)
    with torch.no_grad():
        assert model(_input(IMAGENET_SIZE)).shape == (2, 1000)


def test_preact_block_adds_branch_to_untouched_input() -> None:
    torch.manual_seed(0)
    block = PreActBasicBlock(8, 8).eval()
    _randomize_norms(block, torch.Generator().manual_seed(1))
    x = _input(6, channels=8)  # may be negative: nothing after the addition clips it
    with torch.no_grad():
        branch = block.conv2(torch.relu(block.bn2(block.conv1(torch.relu(block.bn1(x))))))
        torch.testing.assert_close(block(x), x + branch, rtol=0, atol=1e-6)


# --- init ---------------------------------------------------------------------------------------------------


def test_default_init_is_he_fan_out_and_unit_norm() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50")
    conv = model.get_submodule("layer3.0.conv2")
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert math.isclose(conv.weight.std().item(), math.sqrt(2.0 / fan_out), rel_tol=0.05)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "preact_resnet18"])
def test_zero_init_residual_makes_every_block_its_shortcut(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, zero_init_residual=True).eval()
    size = CIFAR_SIZE if model_info(name)["family"] == "cifar" else IMAGENET_SIZE
    checked = 0
    for block in _blocks(model):
        assert torch.all(block.last_norm().weight == 0)
    records: list[tuple[ResidualBlock, Tensor, Tensor]] = []
    hooks = [
        block.register_forward_hook(lambda module, args, output: records.append((module, args[0], output)))
        for block in _blocks(model)
    ]
    with torch.no_grad():
        model(_input(size))
        for block, x, y in records:
            if block.downsample is None:
                # BasicBlock/Bottleneck: relu(0 + x) == x since x is itself a ReLU output; pre-act: 0 + x.
                expected = x if isinstance(block, (PreActBasicBlock, PreActBottleneck)) else torch.relu(x)
                assert torch.equal(y, expected)
                checked += 1
    for hook in hooks:
        hook.remove()
    assert checked == sum(block.downsample is None for block in _blocks(model)) > 0


def test_zero_init_residual_refused_for_plain_resnet_class() -> None:
    with pytest.raises(ValueError, match="plain network"):
        ResNet(BasicBlock, (1, 1, 1, 1), shortcut=None, zero_init_residual=True)


# --- activation checkpointing -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("resnet20", CIFAR_SIZE), ("preact_resnet18", 32)])
def test_checkpoint_activations_same_gradients_and_bn_statistics(name: str, size: int) -> None:
    torch.manual_seed(0)
    plain = build_model(name, num_classes=10)
    checkpointed = build_model(name, num_classes=10, checkpoint_activations=True)
    checkpointed.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        first_block = next(_blocks(model))
        # A pre-hook: non-reentrant checkpointing may stop a recomputation before the block's end.
        first_block.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    x = _input(size, batch=4)
    target = torch.tensor([0, 1, 2, 3])

    for model in (plain, checkpointed):
        model.train()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()

    assert calls == {"plain": 1, "checkpointed": 2}  # the block was recomputed during backward
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=key)
    # The recomputed forward must not fold the batch into BN running statistics a second time.
    for (key, a), b in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=key)

    checkpointed.eval()
    with torch.no_grad():
        checkpointed(x)
    assert calls["checkpointed"] == 3  # no checkpointing outside training with grad


@pytest.mark.heavy
def test_checkpoint_activations_under_torch_compile() -> None:
    # The training loop may wrap the model in torch.compile; dynamo refuses a custom checkpoint context_fn,
    # so the compiled path checkpoints without it (aot_eager: no C++ toolchain needed, still traces AC).
    torch.manual_seed(0)
    reference = build_model("resnet20", num_classes=10).train()
    model = build_model("resnet20", num_classes=10, checkpoint_activations=True).train()
    model.load_state_dict(reference.state_dict())
    x = _input(CIFAR_SIZE, batch=4)
    torch.compile(model, backend="aot_eager")(x).sum().backward()
    reference(x).sum().backward()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(reference.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7)


# --- head ---------------------------------------------------------------------------------------------------


def test_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, dropout=0.5)
    x = _input(CIFAR_SIZE)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet20", dropout=1.0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet20", num_classes=0)


def test_channels_last_gives_same_logits() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, shortcut="A").eval()
    x = _input(CIFAR_SIZE)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- registry -----------------------------------------------------------------------------------------------


def test_models_lists_every_family_sorted() -> None:
    assert isinstance(MODELS, tuple)
    assert list(MODELS) == sorted(MODELS) == list(list_models())
    expected = {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d",
        "plain18", "plain34", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "plain20", "plain32", "plain44", "plain56", "plain110", "preact_resnet18", "preact_resnet50",
    }  # fmt: skip
    assert expected <= set(MODELS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy) if n == "resnet1202" else n for n in MODELS]
)
def test_output_shape_and_info(name: str) -> None:
    info = model_info(name)
    assert info["family"] in ("imagenet", "cifar")
    assert isinstance(info["layers"], int) and str(info["layers"]) in name
    assert info["reference_params"] is None or isinstance(info["reference_params"], int)
    size = CIFAR_SIZE if info["family"] == "cifar" else IMAGENET_SIZE
    # On the meta device shapes propagate through every layer without allocating or computing anything;
    # numerics are checked above on real tensors for every block type, stem, shortcut option and width.
    with torch.device("meta"):
        model = build_model(name, num_classes=7).eval()
        logits = model(torch.empty(2, 3, size, size))
    assert logits.shape == (2, 7)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'ResNet-50' \(did you mean 'resnet50'\?\)") as error:
        build_model("ResNet-50")
    assert all(name in str(error.value) for name in MODELS)
    with pytest.raises(ValueError, match="valid names"):
        model_info("vgg16")


def test_unknown_kwargs_are_named() -> None:
    with pytest.raises(TypeError, match=r"'depth', 'widen'.*accepts: num_classes, shortcut"):
        build_model("resnet50", widen=2, depth=3)


def test_registry_refuses_duplicates() -> None:
    registry = ModelRegistry()

    @registry.register("tiny", layers=4, family="cifar", block="basic", source="test")
    def tiny(*, num_classes: int = 10) -> nn.Module:
        return nn.Linear(3, num_classes)

    with pytest.raises(ValueError, match="'tiny' is already registered"):
        registry.register("tiny", layers=4, family="cifar", block="basic", source="test")(tiny)
    assert registry.names() == ("tiny",)
    assert registry.build("tiny", num_classes=3).out_features == 3

    # The global registry refuses to have a built-in name shadowed, and is left unchanged.
    before = list_models()
    with pytest.raises(ValueError, match="'resnet18' is already registered"):
        registry_module.register_model("resnet18", layers=18, family="imagenet", block="basic", source="x")(
            tiny
        )
    assert list_models() == before
    assert isinstance(build_model("resnet18"), ResNet)


def test_registry_requires_keyword_only_builders() -> None:
    registry = ModelRegistry()

    def positional(num_classes: int = 10) -> nn.Module:
        return nn.Linear(3, num_classes)

    with pytest.raises(TypeError, match="keyword-only"):
        registry.register("positional", layers=1, family="cifar", block="basic", source="test")(positional)
    for name in MODELS:
        parameters = inspect.signature(registry_module.REGISTRY.spec(name).builder).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


def test_block_classes_expose_expansion() -> None:
    assert (BasicBlock.expansion, Bottleneck.expansion) == (1, 4)
    assert (PreActBasicBlock.expansion, PreActBottleneck.expansion) == (1, 4)


def test_library_does_not_use_torchvision_models() -> None:
    # torchvision is only this file's oracle; pipeline/models is our own implementation.
    package = Path(__file__).resolve().parents[1] / "pipeline" / "models"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("torchvision") for alias in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("torchvision"), path
