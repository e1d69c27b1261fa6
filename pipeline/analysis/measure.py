"""Numbers about a network's insides, without plotting: usable from training, the degradation stage and tests.

Every function here leaves the model as it found it: parameters, ``.grad``, BatchNorm running statistics and
the train/eval flag are untouched (measurements run under ``torch.no_grad`` and restore the buffers), so a
training loop can call them between steps.  The model runs in whatever mode the caller put it in; call
``model.eval()`` first to measure the inference-time network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.hooks import RemovableHandle

from pipeline.models.layers import ResidualBlock
from pipeline.models.preact import PreActBasicBlock, PreActBottleneck

LossFn = Callable[[Tensor, Tensor], Tensor]

# Layers whose weight counts as one "weighted layer" of the paper's depth (Fig. 3: the "34-layer" nets are
# 33 convolutions and the final fc).
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


# ---------------------------------------------------------------------------------------------------------
# Small context managers shared by the measurements and the plots
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def hooks_removed(handles: list[RemovableHandle]) -> Iterator[list[RemovableHandle]]:
    """Remove every hook in ``handles`` on exit, even when the forward raises."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def buffers_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every buffer on exit: a forward in train mode folds the batch into BN's running statistics,
    and a measurement must not move the model it measures."""
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore each module's own flag on exit (not just the root's)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def to_model(batch: Tensor, model: nn.Module) -> Tensor:
    """``batch`` on the model's device, and in its dtype when both are floating point."""
    reference = next(model.parameters(), None)
    if reference is None:
        return batch
    if batch.is_floating_point() and reference.is_floating_point():
        return batch.to(device=reference.device, dtype=reference.dtype)
    return batch.to(device=reference.device)


def as_batch(image: Tensor, model: nn.Module) -> Tensor:
    """A (3, H, W) or (N, 3, H, W) image as an (N, 3, H, W) batch on the model's device and dtype."""
    if image.ndim == 3:
        image = image.unsqueeze(0)  # (1, 3, H, W)
    if image.ndim != 4:
        raise ValueError(f"expected an image of shape (3, H, W) or (N, 3, H, W), got {tuple(image.shape)}")
    return to_model(image, model)


def sample_norms(tensor: Tensor) -> Tensor:
    """Per-sample L2 norm over everything but the batch dimension: (N, ...) -> (N,), in float32."""
    return tensor.detach().flatten(1).float().norm(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Residual blocks: where F(x) and the shortcut can be observed
# ---------------------------------------------------------------------------------------------------------


def is_residual_block(module: nn.Module) -> bool:
    """Whether ``module`` computes y = F(x) + shortcut(x) (paper eq. (1)/(2)).

    Our blocks subclass ``ResidualBlock``; a plain block (``residual=False``, section 4.1) has no shortcut and
    is not one.  torchvision's BasicBlock/Bottleneck are recognised by their shape (a ``downsample``
    attribute next to convolutions), so torchvision models can be measured as well.
    """
    if isinstance(module, ResidualBlock):
        return bool(getattr(module, "residual", True))
    return hasattr(module, "downsample") and any(isinstance(c, nn.Conv2d) for c in module.children())


def residual_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every residual block of ``model`` by qualified name ("layer2.0"), in registration (= forward) order."""
    return {name: module for name, module in model.named_modules() if is_residual_block(module)}


def branch_output_module(block: nn.Module) -> nn.Module:
    """The sub-module whose output is the residual branch F(x), just before the addition.

    Post-activation blocks (paper Fig. 2/5, torchvision) end F with a BN (``last_norm()``: bn2 / bn3).
    Pre-activation blocks (He et al. 2016, Fig. 4(e)) end it with a conv (conv2 / conv3); their
    ``last_norm()`` is the BN *before* that conv, so it is not the hook point.  Any other block: the last
    conv/BN child registered outside the shortcut, which is right for all of the above.
    """
    if isinstance(block, PreActBasicBlock):
        return block.conv2
    if isinstance(block, PreActBottleneck):
        return block.conv3
    if isinstance(block, ResidualBlock):
        return block.last_norm()
    candidates = [
        child
        for name, child in block.named_children()
        if name != "downsample" and isinstance(child, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))
    ]
    if not candidates:
        raise ValueError(f"cannot find the end of the residual branch of {type(block).__name__}")
    return candidates[-1]


def skip_contribution(model: nn.Module, images: Tensor) -> dict[str, dict[str, float]]:
    """How much each residual block adds to its shortcut: ``{block: {residual_norm, shortcut_norm, ratio}}``.

    ``residual_norm`` is the batch mean of the per-sample L2 norm of F(x), ``shortcut_norm`` the same for the
    shortcut's output (the identity x, or the option A/B/C projection of section 3.3), and
    ``ratio = residual_norm / shortcut_norm`` (0 when both are 0).  The paper's section 4.2 (Fig. 7) finds
    that ResNets' residual responses are small, i.e. each block is a small perturbation of its identity;
    a ratio well below 1 is that observation.  Plain networks have no residual blocks and give ``{}``.

    Hooks: a forward hook on the branch's last module (``branch_output_module``) sees F(x) before the
    in-place ``out += identity`` modifies it, so the norm is taken inside the hook; the shortcut is the
    ``downsample`` output when there is one, else the block's input (forward pre-hook).
    """
    blocks = residual_blocks(model)
    residual: dict[str, list[Tensor]] = {name: [] for name in blocks}
    shortcut: dict[str, list[Tensor]] = {name: [] for name in blocks}
    handles: list[RemovableHandle] = []
    for name, block in blocks.items():

        def on_branch(_m: nn.Module, _i: Any, output: Tensor, name: str = name) -> None:
            residual[name].append(sample_norms(output))

        def on_shortcut(_m: nn.Module, _i: Any, output: Tensor, name: str = name) -> None:
            shortcut[name].append(sample_norms(output))

        def on_identity(_m: nn.Module, inputs: tuple[Tensor, ...], name: str = name) -> None:
            shortcut[name].append(sample_norms(inputs[0]))

        handles.append(branch_output_module(block).register_forward_hook(on_branch))
        downsample = getattr(block, "downsample", None)
        if isinstance(downsample, nn.Module):
            handles.append(downsample.register_forward_hook(on_shortcut))
        else:
            handles.append(block.register_forward_pre_hook(on_identity))
    with hooks_removed(handles), buffers_preserved(model), torch.no_grad():
        model(as_batch(images, model))
    result: dict[str, dict[str, float]] = {}
    for name in blocks:
        if not residual[name] or not shortcut[name]:
            continue  # the block was not called in this forward (e.g. an unused branch)
        residual_norm = float(torch.cat(residual[name]).mean())
        shortcut_norm = float(torch.cat(shortcut[name]).mean())
        if shortcut_norm > 0:
            ratio = residual_norm / shortcut_norm
        else:
            ratio = 0.0 if residual_norm == 0 else float("inf")
        result[name] = {"residual_norm": residual_norm, "shortcut_norm": shortcut_norm, "ratio": ratio}
    return result


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv and linear layers with a weight, by qualified name, in registration order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, WEIGHTED_LAYERS) and isinstance(getattr(module, "weight", None), Tensor)
    }


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of ``weight.grad`` of every conv/linear layer, by layer name, after a backward pass.

    Layers whose weight has no gradient (frozen, unused) are left out; ``ValueError`` if none has one,
    which means backward has not run yet.  Along the depth these numbers answer the vanishing-gradient
    question of section 1; section 4.1 reports that with BN even the plain nets' gradients "exhibit healthy
    norms", so their degradation is an optimisation difficulty, not vanishing gradients.
    """
    norms = {
        name: float(layer.weight.grad.detach().float().norm())
        for name, layer in weighted_layers(model).items()
        if layer.weight.grad is not None
    }
    if not norms:
        raise ValueError("no conv/linear weight has a gradient: run loss.backward() before gradient_norms")
    return norms


def batch_weight_gradients(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> dict[str, Tensor]:
    """Gradient of ``loss_fn(model(images), targets)`` w.r.t. each conv/linear weight, by layer name.

    Computed with ``torch.autograd.grad``, so the model's ``.grad`` fields are not touched, and the buffers
    are restored.  ``targets=None`` uses the model's own top-1 predictions as labels.
    """
    layers = {name: layer for name, layer in weighted_layers(model).items() if layer.weight.requires_grad}
    if not layers:
        raise ValueError("the model has no trainable conv/linear weight")
    with buffers_preserved(model), torch.enable_grad():
        logits = model(to_model(images, model))  # (N, num_classes)
        if targets is None:
            targets = logits.detach().argmax(dim=1)
        loss = loss_fn(logits, targets.to(logits.device))
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()], allow_unused=True)
    return {name: grad.detach() for name, grad in zip(layers, grads, strict=True) if grad is not None}


def depth_gradient_norms(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> list[tuple[str, float]]:
    """(layer, L2 norm of its weight gradient) along the main path, input to output, for one batch.

    Projection shortcuts (``downsample``) are left out so that position k is the k-th weighted layer as the
    paper counts depth, and a plain net and its ResNet line up layer for layer (section 4.1, Fig. 4).
    """
    grads = batch_weight_gradients(model, images, targets, loss_fn)
    return [
        (name, float(grad.float().norm()))
        for name, grad in grads.items()
        if "downsample" not in name.split(".")
    ]


# ---------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------


def dead_relu_ratio(model: nn.Module, images: Tensor) -> dict[str, float]:
    """Fraction of exactly-zero outputs of every ReLU *call*, over the whole batch ``images``.

    Counted per call, not per module: our blocks reuse one ``nn.ReLU`` twice (after bn1, and after the
    addition, paper Fig. 2), and the two sites see very different inputs.  Keys are ``"<module>#<k>"``, the
    k-th call (1-based) of that module in the forward pass, e.g. ``layer1.0.relu#1`` (inside the branch)
    and ``layer1.0.relu#2`` (after the addition).  Only ``nn.ReLU`` modules are seen, not ``F.relu``.
    """
    calls: dict[str, int] = {}
    ratios: dict[str, float] = {}
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ReLU):
            continue

        def on_relu(_m: nn.Module, _i: Any, output: Tensor, name: str = name) -> None:
            calls[name] = calls.get(name, 0) + 1
            # Read inside the hook: the output of an in-place ReLU is overwritten later in the forward.
            ratios[f"{name}#{calls[name]}"] = float((output == 0).float().mean()) if output.numel() else 0.0

        handles.append(module.register_forward_hook(on_relu))
    with hooks_removed(handles), buffers_preserved(model), torch.no_grad():
        model(to_model(images, model))
    return ratios


# ---------------------------------------------------------------------------------------------------------
# Parameters and shapes
# ---------------------------------------------------------------------------------------------------------


def gradient_stats(model: nn.Module, images: Tensor) -> dict[str, float]:
    """train.log_grad_stats' MLflow metrics of one measured batch, the hook the training loop calls
    (pipeline.training.loop.GradStats; callers pass it as `grad_stats`): `grad_norm/<layer>` (L2 norm of each
    conv/linear weight's gradient, as backward left it), `grad_norm/total` (their joint L2 norm),
    `dead_relu/<relu>.call<k>` (share of exact zeros at the k-th call of that ReLU on `images`, the model in its
    current mode) and `dead_relu/mean`. The paper (section 4.1) argues that with BN the plain nets' gradients
    stay healthy."""
    norms = gradient_norms(model)
    dead = dead_relu_ratio(model, images)
    stats = {f"grad_norm/{name}": value for name, value in norms.items()}
    stats["grad_norm/total"] = math.sqrt(sum(value * value for value in norms.values()))
    # MLflow metric names allow no '#': "layer1.0.relu#2" -> "layer1.0.relu.call2".
    stats.update({f"dead_relu/{name.replace('#', '.call')}": value for name, value in dead.items()})
    if dead:
        stats["dead_relu/mean"] = sum(dead.values()) / len(dead)
    return stats


def layer_param_counts(model: nn.Module) -> list[tuple[str, int]]:
    """(module name, parameters it owns directly) for every module that owns any, in registration order.

    A tensor shared by several modules is counted at its first owner only, so the counts sum to
    ``count_params(model)``.
    """
    seen: set[int] = set()
    counts: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        own = 0
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                own += parameter.numel()
        if own:
            counts.append((name or type(model).__name__, own))
    return counts


def model_summary(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> str:
    """A table of every leaf module call (and of containers owning a tensor themselves): name, type, output
    shape, parameters; totals at the bottom.

    The forward runs on the meta device through ``torch.func.functional_call`` with meta stand-ins for the
    parameters and buffers: shapes come out without computing anything or copying the model, so a
    ResNet-152 at 224 px costs milliseconds.  A module called twice (the blocks' shared ReLU) gets a row per
    call and its parameters only once.  Modules owning parameters that the forward never calls are listed at
    the end as "(not called)", so the total always equals ``count_params(model)``.
    """
    rows: list[tuple[str, str, str, str]] = []
    owned = dict(layer_param_counts(model))
    reported: set[str] = set()
    handles: list[RemovableHandle] = []
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if next(module.children(), None) is not None and label not in owned:
            continue  # containers are summed up by their children's rows; ones owning a tensor get a row

        def on_leaf(m: nn.Module, _i: Any, output: Any, label: str = label) -> None:
            params = owned.get(label, 0) if label not in reported else 0
            reported.add(label)
            rows.append((label, type(m).__name__, _shape_text(output), f"{params:,}" if params else "-"))

        handles.append(module.register_forward_hook(on_leaf))
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    with hooks_removed(handles), torch.no_grad():
        functional_call(model, meta_state, (torch.empty(tuple(input_size), device="meta"),))
    for label, params in owned.items():
        if label not in reported:
            rows.append((label, type(model.get_submodule(label)).__name__, "(not called)", f"{params:,}"))
    total = sum(owned.values())
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    header = ("Layer", "Type", "Output shape", "Params")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, str, str, str]) -> str:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        return "  ".join([*cells, row[3].rjust(widths[3])])  # params right-aligned, as numbers read

    rule = "-" * len(line(header))
    body = [line(header), rule, *(line(row) for row in rows), "=" * len(rule)]
    body += [
        f"Input size: {tuple(input_size)}",
        f"Total params: {total:,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {total - trainable:,}",
    ]
    return "\n".join(body)


def _shape_text(output: Any) -> str:
    """``(1, 64, 56, 56)`` for a tensor; a list of shapes for a tuple/list of tensors."""
    if isinstance(output, Tensor):
        return str(tuple(output.shape))
    if isinstance(output, (tuple, list)):
        return "[" + ", ".join(_shape_text(item) for item in output) + "]"
    return type(output).__name__
