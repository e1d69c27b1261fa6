"""Every figure and number of `pipeline.analysis` for one trained model directory and one image
(`python -m pipeline analyze --model models/ARCH --image FILE`).

Written to the output folder:

    residual_flow.png        x, F(x), shortcut(x) and y of one residual block (none for a plain network)
    gradient_flow.png        |gradient| of every conv/linear weight for this image (label: the model's prediction)
    feature_maps.png         the first channels after the stem and after every stage
    skip_contribution.json   ||F(x)|| / ||shortcut(x)|| per residual block (paper sec. 4.2, Fig. 7), prediction
    model_summary.txt        every layer's output shape and parameters for the model's eval crop
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


class AnalysisInputError(ValueError):
    """The user's input (image file, layer name) is wrong; the message names it."""


def load_image(path: str | Path, resize: int, crop: int) -> torch.Tensor:
    """`path` through the model's eval transform, normalised: (1, 3, crop, crop) float32.
    AnalysisInputError naming the file when it is missing or not a readable image."""
    from pipeline.data.transforms import normalize, val_image

    path = Path(path)
    if not path.is_file():
        raise AnalysisInputError(f"no such image file: {path}")
    from PIL import UnidentifiedImageError

    try:
        pixels = val_image(path.read_bytes(), resize, crop)  # (3, crop, crop) uint8
    except UnidentifiedImageError:
        raise AnalysisInputError(f"cannot read image {path}: not an image file PIL can decode") from None
    except Exception as exc:  # noqa: BLE001 - any decoder error is the user's file: say which
        raise AnalysisInputError(f"cannot read image {path}: {exc}") from None
    return normalize(torch.from_numpy(pixels).unsqueeze(0))


def default_flow_block(model: nn.Module) -> str | None:
    """The block the residual-flow figure shows: the first block of stage 2 ("layer2.0", where the shortcut
    changes shape, sec. 3.3) when there is one, else the first residual block; None for a plain network."""
    from pipeline.analysis.measure import residual_blocks

    blocks = list(residual_blocks(model))
    if not blocks:
        return None
    return "layer2.0" if "layer2.0" in blocks else blocks[0]


def feature_map_layers(model: nn.Module) -> list[str]:
    """The stem convolution and every stage (`conv1`, `layer1`, ...), the modules whose outputs are maps."""
    names = [name for name, _ in model.named_children() if name == "conv1" or name.startswith("layer")]
    return names or [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)][:4]


def analyze_model_dir(
    model_dir: str | Path, image: str | Path, out_dir: str | Path, layer: str | None = None
) -> dict[str, Path]:
    """Write the figures and numbers listed in the module docstring; returns {what: path}."""
    from pipeline.analysis.measure import model_summary, residual_blocks, skip_contribution
    from pipeline.analysis.plots import ResNetVisualizer
    from pipeline.training.checkpoint import load_model_dir

    model, meta = load_model_dir(model_dir)  # eval mode: BN on its running statistics, as at inference
    transform = meta["eval_transform"]
    crop = int(transform["crop"])
    x = load_image(image, int(transform["resize"]), crop)  # (1, 3, crop, crop)
    blocks = residual_blocks(model)
    if layer is not None and layer not in blocks:
        valid = ", ".join(blocks) or "none (a plain network has no shortcuts)"
        raise AnalysisInputError(
            f"--layer {layer!r} is not a residual block of {meta['arch']}; residual blocks: {valid}"
        )
    layer = layer or default_flow_block(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    viz = ResNetVisualizer(model)
    written: dict[str, Path] = {}
    if layer is not None:
        written["residual flow"] = viz.plot_residual_flow(x, layer, out / "residual_flow.png")
    written["gradient flow"] = viz.plot_gradient_flow(out / "gradient_flow.png", images=x)
    written["feature maps"] = viz.plot_feature_maps(x, feature_map_layers(model), out / "feature_maps.png")

    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0]  # (num_classes,)
    top = int(probs.argmax())
    classes: list[str] = list(meta.get("classes", []))
    names: dict[str, str] = dict(meta.get("class_names") or {})
    wnid = classes[top] if top < len(classes) else str(top)
    numbers: dict[str, Any] = {
        "model": str(model_dir), "arch": meta["arch"], "image": str(image),
        "prediction": {"class_id": top, "wnid": wnid, "name": names.get(wnid, ""), "prob": float(probs[top])},
        "residual_flow_block": layer,
        "skip_contribution": skip_contribution(model, x),
        "note": ("ratio = ||F(x)|| / ||shortcut(x)|| per residual block, on this one image" if blocks
                 else "a plain network: no residual blocks, no shortcuts to compare"),
    }
    path = out / "skip_contribution.json"
    path.write_text(json.dumps(numbers, indent=2) + "\n")
    written["skip contribution"] = path
    path = out / "model_summary.txt"
    path.write_text(f"{meta['arch']} ({model_dir})\n\n{model_summary(model, (1, 3, crop, crop))}\n")
    written["model summary"] = path
    return written
