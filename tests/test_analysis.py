"""Tests for pipeline.analysis: measurements with known answers, and every plot writes a real PNG.

CPU only, tiny inputs (CIFAR nets at 32 px, ImageNet layouts at 64 px, batch 2), one thread: the whole file
runs in seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.analysis import (
    ResNetVisualizer,
    compare_gradient_flow,
    dead_relu_ratio,
    depth_gradient_norms,
    gradient_norms,
    layer_param_counts,
    model_summary,
    plot_degradation,
    residual_blocks,
    skip_contribution,
)
from pipeline.models import (
    BasicBlock,
    Bottleneck,
    PreActBasicBlock,
    PreActBottleneck,
    PreActResNet,
    ResidualBlock,
    ResNet,
    build_model,
    count_params,
)

CIFAR = (2, 3, 32, 32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


def images(shape: tuple[int, ...] = CIFAR, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tiny_nets() -> dict[str, nn.Module]:
    """One small network per block type: post-activation basic/bottleneck, pre-activation basic/bottleneck,
    option A (zero-pad), B (projection where needed) and C (projection everywhere) shortcuts."""
    return {
        "resnet20_A": build_model("resnet20", num_classes=10),
        "basic_C": ResNet(BasicBlock, (1, 1), widths=(8, 16), stem="cifar", num_classes=5, shortcut="C"),
        "bottleneck_B": ResNet(Bottleneck, (1, 1), widths=(4, 8), stem="cifar", num_classes=5),
        "preact_basic": PreActResNet(PreActBasicBlock, (2, 1), widths=(8, 16), stem="cifar", num_classes=5),
        "preact_bottleneck": PreActResNet(
            PreActBottleneck, (1, 2), widths=(4, 8), stem="cifar", num_classes=5
        ),
    }


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------
# skip_contribution
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(tiny_nets()))
def test_zeroed_residual_branch_contributes_nothing(name: str) -> None:
    model = tiny_nets()[name]
    blocks = residual_blocks(model)
    assert blocks and all(isinstance(b, ResidualBlock) for b in blocks.values())
    with torch.no_grad():
        for block in blocks.values():
            # zero_init_residual plus bias 0: the branch's last BN outputs 0 (post-act: F(x) = 0 directly;
            # pre-act: the last conv, which has no bias, gets an all-zero input).
            block.last_norm().weight.zero_()
            block.last_norm().bias.zero_()
    stats = skip_contribution(model, images())
    assert set(stats) == set(blocks)
    for block_stats in stats.values():
        assert block_stats["residual_norm"] == 0.0
        assert block_stats["ratio"] == 0.0
        assert block_stats["shortcut_norm"] > 0.0


def test_skip_contribution_norms_match_the_block_arithmetic() -> None:
    """For an identity block y = relu(F(x) + x): recover F(x) = (y_pre_relu - x) independently."""
    model = build_model("resnet20", num_classes=10).eval()
    block = model.get_submodule("layer1.1")
    seen: dict[str, Tensor] = {}
    block.register_forward_pre_hook(lambda _m, i: seen.__setitem__("x", i[0].clone()))
    block.bn2.register_forward_hook(lambda _m, _i, o: seen.__setitem__("f", o.clone()))
    x = images()
    stats = skip_contribution(model, x)["layer1.1"]
    model(x)
    expected_res = seen["f"].flatten(1).norm(dim=1).mean().item()
    expected_sc = seen["x"].flatten(1).norm(dim=1).mean().item()
    assert stats["residual_norm"] == pytest.approx(expected_res, rel=1e-5)
    assert stats["shortcut_norm"] == pytest.approx(expected_sc, rel=1e-5)
    assert stats["ratio"] == pytest.approx(expected_res / expected_sc, rel=1e-5)


def test_skip_contribution_leaves_the_model_as_found() -> None:
    model = build_model("resnet20", num_classes=10)  # train mode: BN would update its running stats
    before = state(model)
    stats = skip_contribution(model, images())
    assert len(stats) == 9  # 3 stages x 3 blocks (section 4.2, n = 3)
    assert model.training
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_plain_network_has_no_residual_blocks() -> None:
    assert skip_contribution(build_model("plain20", num_classes=10), images()) == {}


# ---------------------------------------------------------------------------------------------------------
# dead_relu_ratio
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bias", "expected"), [(-1.0, 1.0), (1.0, 0.0)])
def test_dead_relu_known_answer(bias: float, expected: float) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()  # output = bias everywhere
        model[0].bias.fill_(bias)
    assert dead_relu_ratio(model, torch.randn(5, 4)) == {"1#1": expected}


def test_dead_relu_counts_each_call_of_a_shared_relu() -> None:
    model = build_model("resnet20", num_classes=10)
    ratios = dead_relu_ratio(model, images())
    # The stem's ReLU, then each of the 9 BasicBlocks calls its one nn.ReLU twice (Fig. 2).
    assert len(ratios) == 1 + 2 * 9
    assert {"relu#1", "layer1.0.relu#1", "layer1.0.relu#2", "layer3.2.relu#2"} <= set(ratios)
    assert all(0.0 <= r <= 1.0 for r in ratios.values())


# ---------------------------------------------------------------------------------------------------------
# gradient_norms
# ---------------------------------------------------------------------------------------------------------


def test_gradient_norms_match_a_manual_computation() -> None:
    """loss = sum of logits: dL/dW_fc[i, j] = sum_n h_n[j] for every class i, with h the pooled features."""
    model = build_model("resnet20", num_classes=10)
    features: dict[str, Tensor] = {}
    model.fc.register_forward_pre_hook(lambda _m, i: features.__setitem__("h", i[0].detach().clone()))
    model(images()).sum().backward()
    expected = features["h"].sum(dim=0).expand(10, -1)  # (10, 64)
    norms = gradient_norms(model)
    assert norms["fc"] == pytest.approx(float(expected.norm()), rel=1e-5)
    assert norms["conv1"] == pytest.approx(float(model.conv1.weight.grad.norm()), rel=1e-6)


def test_gradient_norms_plain_vs_residual() -> None:
    x, y = images(), torch.tensor([1, 7])
    result = {}
    for name in ("plain20", "resnet20"):
        model = build_model(name, num_classes=10)
        F.cross_entropy(model(x), y).backward()
        result[name] = gradient_norms(model)
        # Batch gradients computed without .grad agree with the ones backward stored.
        by_depth = dict(depth_gradient_norms(model, x, y))
        assert by_depth == pytest.approx(result[name], rel=1e-4)
    # 19 convs + fc = the 20 weighted layers of both (option A shortcuts have no weights, section 4.2).
    assert len(result["plain20"]) == len(result["resnet20"]) == 20
    assert list(result["plain20"]) == list(result["resnet20"])
    assert all(v > 0 for norms in result.values() for v in norms.values())


def test_gradient_norms_without_backward_raises() -> None:
    with pytest.raises(ValueError, match="backward"):
        gradient_norms(build_model("resnet20", num_classes=10))


def test_depth_gradient_norms_skip_projection_shortcuts() -> None:
    model = build_model("resnet18", num_classes=10)
    norms = depth_gradient_norms(model, images((2, 3, 64, 64)), torch.tensor([0, 3]))
    assert len(norms) == 18  # the paper's 18 weighted layers; the 3 downsample projections are left out
    assert model.conv1.weight.grad is None  # computed with autograd.grad, .grad untouched


# ---------------------------------------------------------------------------------------------------------
# layer_param_counts / model_summary
# ---------------------------------------------------------------------------------------------------------


def summary_total(text: str) -> int:
    match = re.search(r"^Total params: ([\d,]+)$", text, re.MULTILINE)
    assert match, text
    return int(match.group(1).replace(",", ""))


@pytest.mark.parametrize(
    ("name", "input_size"), [("resnet18", (1, 3, 224, 224)), ("resnet20", (1, 3, 32, 32))]
)
def test_model_summary_total_equals_count_params(name: str, input_size: tuple[int, ...]) -> None:
    model = build_model(name, num_classes=1000 if name == "resnet18" else 10)
    before = state(model)
    text = model_summary(model, input_size)
    assert summary_total(text) == count_params(model)
    fc_row = next(line for line in text.splitlines() if line.startswith("fc "))
    assert "Linear" in fc_row and f"(1, {model.fc.out_features})" in fc_row
    if name == "resnet18":
        conv1_row = next(line for line in text.splitlines() if line.startswith("conv1 "))
        assert "(1, 64, 112, 112)" in conv1_row and "9,408" in conv1_row  # Table 1: conv1 output 112x112
    after = state(model)  # ran on meta stand-ins: the real model is untouched
    assert all(torch.equal(before[k], after[k]) and after[k].device.type == "cpu" for k in before)


def test_model_summary_default_input_and_shared_params() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)  # one tensor, two call sites
    text = model_summary(model, (2, 4))
    assert summary_total(text) == count_params(model) == 20

    class Scaled(nn.Module):  # a container that owns a tensor itself, next to a child
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.linear = nn.Linear(2, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.scale * self.linear(x)

    text = model_summary(nn.Sequential(Scaled(), nn.Linear(3, 1)), (2, 2))
    assert summary_total(text) == 3 + 9 + 4
    assert re.search(r"^0 +Scaled +\(2, 3\) +3$", text, re.MULTILINE), text
    assert summary_total(model_summary(build_model("resnet20", num_classes=10))) == count_params(
        build_model("resnet20", num_classes=10)
    )


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "plain20", "preact_resnet18"])
def test_layer_param_counts_sum_to_count_params(name: str) -> None:
    model = build_model(name, num_classes=10)
    counts = layer_param_counts(model)
    assert sum(n for _, n in counts) == count_params(model)
    assert dict(counts)["conv1"] == model.conv1.weight.numel()


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("resnet20", 32), ("preact_resnet18", 64)])
def test_plot_residual_flow(tmp_path: Path, name: str, size: int) -> None:
    model = build_model(name, num_classes=10)
    viz = ResNetVisualizer(model)
    # layer2.0 changes shape: projection (option B) for resnet18, zero padding (option A) for resnet20.
    out = viz.plot_residual_flow(images((3, size, size)), "layer2.0", tmp_path / "flow" / f"{name}.png")
    assert out == tmp_path / "flow" / f"{name}.png"
    assert_png(out)
    assert model.training  # eval mode only for the plot


@pytest.mark.parametrize(("name", "post_activation"), [("resnet20", True), ("preact_resnet18", False)])
def test_block_tensors_add_up(name: str, post_activation: bool) -> None:
    """What the residual-flow plot shows is eq. (1): y = relu(F(x) + shortcut(x)) (He et al. 2015, Fig. 2),
    or y = F(x) + x without the final ReLU for pre-activation units (He et al. 2016, eq. (4))."""
    size = 32 if name == "resnet20" else 64
    parts = ResNetVisualizer(build_model(name, num_classes=10)).block_tensors(
        images((3, size, size)), "layer2.0"
    )
    total = parts["residual"] + parts["shortcut"]
    expected = total.clamp(min=0) if post_activation else total
    assert parts["output"].shape == parts["shortcut"].shape
    assert torch.allclose(parts["output"], expected, atol=1e-5)


def test_plot_residual_flow_rejects_non_residual_layers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a residual block"):
        ResNetVisualizer(build_model("plain20", num_classes=10)).plot_residual_flow(
            images((3, 32, 32)), "layer2.0", tmp_path / "x.png"
        )
    with pytest.raises(ValueError, match="no module"):
        ResNetVisualizer(build_model("resnet20", num_classes=10)).plot_residual_flow(
            images((3, 32, 32)), "layer9.0", tmp_path / "x.png"
        )


def test_plot_gradient_flow(tmp_path: Path) -> None:
    model = build_model("resnet20", num_classes=10)
    viz = ResNetVisualizer(model)
    with pytest.raises(ValueError, match="no gradients"):
        viz.plot_gradient_flow(tmp_path / "none.png")
    assert_png(viz.plot_gradient_flow(tmp_path / "batch.png", images(), torch.tensor([0, 1])))
    assert_png(viz.plot_gradient_flow(tmp_path / "own_predictions.png", images()))
    F.cross_entropy(model(images()), torch.tensor([2, 3])).backward()
    assert_png(viz.plot_gradient_flow(tmp_path / "after_backward.png"))


def test_plot_feature_maps(tmp_path: Path) -> None:
    viz = ResNetVisualizer(build_model("resnet20", num_classes=10))
    out = viz.plot_feature_maps(images((1, 3, 32, 32)), ["conv1", "layer1", "layer3.2"], tmp_path / "fm.png")
    assert_png(out)
    with pytest.raises(ValueError, match="feature map"):
        viz.plot_feature_maps(images((3, 32, 32)), ["fc"], tmp_path / "fc.png")


def test_compare_gradient_flow(tmp_path: Path) -> None:
    models = {name: build_model(name, num_classes=10) for name in ("plain20", "resnet20")}
    out = compare_gradient_flow(models, images(), torch.tensor([4, 5]), tmp_path / "cmp.png")
    assert_png(out)


def test_plot_degradation(tmp_path: Path) -> None:
    def history(start: float) -> list[dict[str, float]]:
        return [
            {"epoch": e, "train_top1_err": start - 5 * e, "val_top1_err": start + 3 - 4 * e} for e in range(5)
        ]

    curves = {
        "plain20": history(60),
        "plain56": history(65),
        "resnet20": history(55),
        "resnet56": history(50),
    }
    assert_png(plot_degradation(curves, tmp_path / "fig6.png"))
    assert_png(plot_degradation({"resnet20": history(55)}, tmp_path / "one.png"))  # one family, one panel
    with pytest.raises(ValueError, match="val_top1_err"):
        plot_degradation({"resnet20": [{"epoch": 0, "train_top1_err": 1.0}]}, tmp_path / "bad.png")


@pytest.mark.subprocess
def test_training_workers_do_not_import_matplotlib() -> None:
    """The loop's gradient statistics import pipeline.analysis.measure (and so the package); the figures
    (matplotlib) load on first use."""
    import subprocess
    import sys

    code = ("import sys, pipeline.training.loop, pipeline.analysis.measure; "
            "assert 'matplotlib' not in sys.modules, 'the measurements imported matplotlib'; "
            "from pipeline.analysis import ResNetVisualizer; assert 'matplotlib' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
