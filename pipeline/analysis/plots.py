"""The cheatsheet's visualisations: residual flow, gradient flow, feature maps, degradation curves.

Figures are built on ``matplotlib.figure.Figure`` directly (the Agg canvas behind ``savefig``), never through
``pyplot``: no global figure registry to leak from a long training process, no display backend, nothing
shown; safe in Ray workers and tests.  Every function writes one PNG and returns its path; the numbers come
from ``pipeline.analysis.measure``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pipeline.analysis.measure import (
    LossFn,
    as_batch,
    batch_weight_gradients,
    branch_output_module,
    depth_gradient_norms,
    eval_mode,
    hooks_removed,
    is_residual_block,
    residual_blocks,
    weighted_layers,
)

DPI = 120
# Colour families of the paper's Fig. 4 / Fig. 6 spirit: plain nets warm, ResNets cool, deeper = darker.
PLAIN_CMAP = "Oranges"
RESNET_CMAP = "Blues"


def _save(fig: Figure, out: Path) -> Path:
    """Write ``fig`` as PNG to ``out`` (parents created) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight")
    return out


def _depth(name: str) -> int:
    """The depth in a model name ("resnet56" -> 56, "plain-18" -> 18); 0 when there is none."""
    numbers = re.findall(r"\d+", name)
    return int(numbers[0]) if numbers else 0


def _family_colours(names: Sequence[str], cmap: str) -> dict[str, Any]:
    """One shade of ``cmap`` per name, shallow light to deep dark (the paper's 18 vs 34, 20 vs 56...)."""
    ordered = sorted(names, key=lambda n: (_depth(n), n))
    if len(ordered) == 1:
        return {ordered[0]: colormaps[cmap](0.8)}
    return {name: colormaps[cmap](0.45 + 0.5 * i / (len(ordered) - 1)) for i, name in enumerate(ordered)}


def _is_plain_name(name: str) -> bool:
    return "plain" in name.lower()


def _sparse_ticks(ax: Axes, labels: Sequence[str], max_labels: int = 60) -> None:
    """Layer names under the x axis, thinned to at most ``max_labels`` so ResNet-152 stays legible."""
    step = max(1, math.ceil(len(labels) / max_labels))
    positions = list(range(0, len(labels), step))
    ax.set_xticks(positions)
    ax.set_xticklabels([labels[i] for i in positions], rotation=90, fontsize=6)


class ResNetVisualizer:
    """Pictures of one model's insides.  The model is only read: every forward runs in eval mode (BN on
    its running statistics, as at inference) under ``no_grad`` and the train/eval flags are restored."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -----------------------------------------------------------------------------------------------------
    def block_tensors(self, image: Tensor, layer: str) -> dict[str, Tensor]:
        """x, F(x), shortcut(x) and the block output for the residual block ``layer``, first sample only.

        Each is (C, H, W).  Tensors are cloned inside the hooks because the block adds in place
        (``out += identity``) and its ReLU is in place.
        """
        block = self._residual_block(layer)
        captured: dict[str, Tensor] = {}

        def keep(key: str, tensor: Tensor) -> None:
            captured[key] = tensor.detach()[0].float().clone()  # (C, H, W)

        handles: list[RemovableHandle] = [
            block.register_forward_pre_hook(lambda _m, inputs: keep("input", inputs[0])),
            branch_output_module(block).register_forward_hook(lambda _m, _i, out: keep("residual", out)),
            block.register_forward_hook(lambda _m, _i, out: keep("output", out)),
        ]
        downsample = getattr(block, "downsample", None)
        if isinstance(downsample, nn.Module):
            handles.append(downsample.register_forward_hook(lambda _m, _i, out: keep("shortcut", out)))
        with hooks_removed(handles), eval_mode(self.model), torch.no_grad():
            self.model(as_batch(image, self.model))
        if "shortcut" not in captured:
            captured["shortcut"] = captured["input"]  # identity shortcut, eq. (1)
        return captured

    def plot_residual_flow(self, image: Tensor, layer: str, out: Path) -> Path:
        """Channel-mean heatmaps of x, F(x), shortcut(x) and the block output, side by side.

        The three maps after the split share one colour scale (they have one shape), so the size of the
        residual against the shortcut is visible at a glance: the paper's section 4.2 (Fig. 7) reports
        that residual functions respond weakly, i.e. F(x) is small next to x.
        """
        tensors = self.block_tensors(image, layer)
        block = self.model.get_submodule(layer)
        downsample = getattr(block, "downsample", None)
        shortcut_kind = "identity" if downsample is None else type(downsample).__name__
        if isinstance(downsample, nn.Sequential):
            shortcut_kind = "projection"  # option B/C of section 3.3: 1x1 conv + BN
        panels = [
            ("input x", tensors["input"]),
            ("residual F(x)", tensors["residual"]),
            (f"shortcut ({shortcut_kind})", tensors["shortcut"]),
            ("output y", tensors["output"]),
        ]
        maps = {title: tensor.mean(dim=0).cpu().numpy() for title, tensor in panels}  # (H, W) each
        shared = np.concatenate([maps[title].ravel() for title, _ in panels[1:]])
        limit = float(np.abs(shared).max()) or 1.0
        fig = Figure(figsize=(16, 4.2))
        axes = fig.subplots(1, 4)
        for index, (ax, (title, tensor)) in enumerate(zip(axes, panels, strict=True)):
            heat = maps[title]
            if index == 0:
                image_artist = ax.imshow(heat, cmap="viridis")
            else:
                # Diverging and centred on 0: F(x) is signed, and the scale is shared across panels 2-4.
                image_artist = ax.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit)
            norm = float(tensor.norm())
            ax.set_title(f"{title}\n{tuple(tensor.shape)}  ||.||={norm:.3g}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(image_artist, ax=ax, fraction=0.046, pad=0.04)
        ratio = float(tensors["residual"].norm()) / max(float(tensors["shortcut"].norm()), 1e-12)
        fig.suptitle(
            f"{layer} ({type(block).__name__}): y = F(x) + shortcut(x), eq. (1)/(2);  "
            f"||F(x)|| / ||shortcut(x)|| = {ratio:.3f}  (heatmaps: mean over channels)"
        )
        return _save(fig, out)

    # -----------------------------------------------------------------------------------------------------
    def plot_gradient_flow(
        self,
        out: Path,
        images: Tensor | None = None,
        targets: Tensor | None = None,
        loss_fn: LossFn = F.cross_entropy,
    ) -> Path:
        """Mean and max |grad| of every conv/linear weight, input to output (the classic gradient-flow plot).

        Uses the gradients already in ``.grad`` (call it after ``loss.backward()``).  When no weight has a
        gradient yet, runs one forward/backward on ``images``/``targets`` (``targets=None``: the model's own
        predictions) with ``torch.autograd.grad``, leaving ``.grad`` and BN statistics untouched.  Log scale:
        vanishing gradients (the problem normalised init and BN address, paper section 1) span decades.
        """
        grads: dict[str, Tensor] = {
            name: layer.weight.grad.detach()
            for name, layer in weighted_layers(self.model).items()
            if layer.weight.grad is not None
        }
        source = "model .grad"
        if not grads:
            if images is None:
                raise ValueError("the model has no gradients yet: pass images (and targets) to compute them")
            grads = batch_weight_gradients(self.model, images, targets, loss_fn)
            source = f"one batch of {len(images)}"
        names = list(grads)
        mean_abs = np.array([float(g.abs().float().mean()) for g in grads.values()])
        max_abs = np.array([float(g.abs().float().max()) for g in grads.values()])
        positions = np.arange(len(names))
        fig = Figure(figsize=(max(8.0, 0.16 * len(names) + 3), 5))
        ax = fig.subplots()
        ax.bar(positions, max_abs, width=0.8, color="#9ecae1", label="max |grad|")
        ax.bar(positions, mean_abs, width=0.8, color="#08519c", label="mean |grad|")
        ax.plot(positions, mean_abs, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlim(-0.5, len(names) - 0.5)
        _sparse_ticks(ax, names)
        ax.set_ylabel("|gradient| of weight")
        ax.set_title(f"Gradient flow, input (left) to output (right); {source}")
        ax.legend(loc="upper left")
        ax.grid(axis="y", which="both", alpha=0.3)
        return _save(fig, out)

    # -----------------------------------------------------------------------------------------------------
    def feature_maps(self, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """The first sample's (C, H, W) activation at the output of each named module."""
        captured: dict[str, Tensor] = {}
        handles: list[RemovableHandle] = []
        for name in layers:
            module = self.model.get_submodule(name)

            def keep(_m: nn.Module, _i: Any, output: Any, name: str = name) -> None:
                captured[name] = output.detach()[0].float().clone()  # (C, H, W); cloned: in-place ReLUs

            handles.append(module.register_forward_hook(keep))
        with hooks_removed(handles), eval_mode(self.model), torch.no_grad():
            self.model(as_batch(image, self.model))
        for name in layers:
            if name not in captured:
                raise ValueError(f"layer {name!r} was not called in the forward pass")
            if captured[name].ndim != 3:
                shape = tuple(captured[name].shape)
                raise ValueError(f"layer {name!r} gives {shape} per image, not a (C, H, W) feature map")
        return captured

    def plot_feature_maps(self, image: Tensor, layers: list[str], out: Path, max_channels: int = 16) -> Path:
        """A grid: one row per layer, its first ``max_channels`` channels, each on its own colour scale."""
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        if not layers:
            raise ValueError("layers is empty: name at least one module, e.g. 'layer1'")
        activations = self.feature_maps(image, layers)
        columns = min(max_channels, max(t.shape[0] for t in activations.values()))
        fig = Figure(figsize=(1.1 * columns + 1.5, 1.2 * len(layers) + 0.6))
        axes = np.atleast_2d(fig.subplots(len(layers), columns, squeeze=False))
        for row, name in enumerate(layers):
            activation = activations[name].cpu().numpy()  # (C, H, W)
            for column in range(columns):
                ax = axes[row, column]
                ax.set_xticks([])
                ax.set_yticks([])
                if column >= activation.shape[0]:
                    ax.set_axis_off()
                    continue
                ax.imshow(activation[column], cmap="viridis")
                if row == 0:
                    ax.set_title(f"ch {column}", fontsize=6)
            channels, height, width = activation.shape
            axes[row, 0].set_ylabel(f"{name}\n{channels}x{height}x{width}", fontsize=7)
        fig.suptitle(f"Feature maps (first {columns} channels)")
        return _save(fig, out)

    # -----------------------------------------------------------------------------------------------------
    def _residual_block(self, layer: str) -> nn.Module:
        try:
            block = self.model.get_submodule(layer)
        except AttributeError:
            valid = ", ".join(residual_blocks(self.model)) or "none"
            raise ValueError(f"no module {layer!r}; residual blocks: {valid}") from None
        if not is_residual_block(block):
            valid = ", ".join(residual_blocks(self.model)) or "none (a plain network has no shortcuts)"
            raise ValueError(
                f"{layer!r} ({type(block).__name__}) is not a residual block; residual blocks: {valid}"
            )
        return block


def compare_gradient_flow(
    models: Mapping[str, nn.Module],
    images: Tensor,
    targets: Tensor,
    out: Path,
    loss_fn: LossFn = F.cross_entropy,
) -> Path:
    """Per-depth L2 gradient norm of each model on the same batch, one line per model, log scale.

    Depth k is the k-th weighted layer of the main path (``depth_gradient_norms``), so plain-20 and
    ResNet-20 line up layer for layer.  The paper (section 4.1) argues the plain nets' degradation is *not*
    vanishing gradients (BN keeps them healthy); this figure is where that is checked.  Models without
    residual blocks are drawn in the plain colour family, the others in the ResNet family.
    """
    if not models:
        raise ValueError("models is empty")
    plain = [name for name, model in models.items() if not residual_blocks(model)]
    residual = [name for name in models if name not in plain]
    colours = {**_family_colours(plain, PLAIN_CMAP), **_family_colours(residual, RESNET_CMAP)}
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for name, model in models.items():
        norms = depth_gradient_norms(model, images, targets, loss_fn)
        depths = np.arange(1, len(norms) + 1)
        style = "--" if name in plain else "-"
        ax.plot(depths, [value for _, value in norms], style, marker=".", color=colours[name], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("weighted layer (input -> output)")
    ax.set_ylabel("||dL/dW||_2")
    ax.set_title(f"Gradient norm per layer, one batch of {len(images)}")
    ax.grid(which="both", alpha=0.3)
    ax.legend()
    return _save(fig, out)


REQUIRED_CURVE_KEYS = ("epoch", "train_top1_err", "val_top1_err")


def plot_degradation(curves: Mapping[str, Sequence[Mapping[str, float]]], out: Path) -> Path:
    """Training (thin, dashed) and validation (bold) top-1 error per epoch, paper Fig. 4 / Fig. 6 style.

    ``curves[name]`` is the per-epoch history ``[{"epoch", "train_top1_err", "val_top1_err", ...}]`` (errors
    in %, as the training loop writes them).  As in Fig. 4 ("Left: plain networks. Right: ResNets"), plain
    models (name containing "plain") and ResNets get their own panel, sharing the y axis, when both are
    present; plain nets are drawn in warm colours, ResNets in cool ones, deeper darker.  The degradation
    problem (section 4.1) shows as the deeper plain net's *training* error sitting above the shallower one's.
    """
    if not curves:
        raise ValueError("curves is empty")
    for name, history in curves.items():
        if not history:
            raise ValueError(f"curves[{name!r}] is empty")
        for row in history:
            missing = [key for key in REQUIRED_CURVE_KEYS if key not in row]
            if missing:
                raise ValueError(f"curves[{name!r}] has an entry without {missing}: {dict(row)}")
    plain = [name for name in curves if _is_plain_name(name)]
    residual = [name for name in curves if not _is_plain_name(name)]
    colours = {**_family_colours(plain, PLAIN_CMAP), **_family_colours(residual, RESNET_CMAP)}
    groups = [(title, names) for title, names in (("plain networks", plain), ("ResNets", residual)) if names]
    fig = Figure(figsize=(6.5 * len(groups), 4.8))
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    for ax, (title, names) in zip(axes, groups, strict=True):
        for name in sorted(names, key=lambda n: (_depth(n), n)):
            history = sorted(curves[name], key=lambda row: row["epoch"])
            epochs = [row["epoch"] for row in history]
            colour = colours[name]
            ax.plot(epochs, [row["train_top1_err"] for row in history], "--", linewidth=1.0, color=colour)
            ax.plot(
                epochs, [row["val_top1_err"] for row in history], "-", linewidth=2.5, color=colour, label=name
            )
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        style_keys = [
            Line2D([], [], color="grey", linestyle="--", linewidth=1.0, label="train"),
            Line2D([], [], color="grey", linestyle="-", linewidth=2.5, label="val"),
        ]
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=[*handles, *style_keys], fontsize=8)
    axes[0].set_ylabel("top-1 error (%)")
    fig.suptitle("Training (thin dashed) and validation (bold) error, cf. He et al. 2015 Fig. 4 / Fig. 6")
    return _save(fig, out)
