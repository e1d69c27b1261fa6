"""torchvision's pretrained ImageNet weights, found on this machine (never downloaded).

Our models keep torchvision's state_dict keys (tests/test_models.py), so a torchvision checkpoint loads with
strict=True. Two users: fine-tuning (`train.pretrained`, `python -m pipeline train --pretrained`) starts from
them, and the evaluate stage re-evaluates them with our own code as the report's reference row.

Where we look: an explicit file path, else torch.hub's cache (`$TORCH_HOME/hub/checkpoints`, by default
~/.cache/torch/hub/checkpoints), where `torchvision.models.resnet50(weights=...)` leaves its downloads.
The V1 files are preferred: they are the cheatsheet's numbers (resize 256, crop 224); V2 (resize 232) next.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# arch -> torchvision's file names, V1 first (the names are torchvision's hub URLs' basenames).
TORCHVISION_FILES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
    "resnet101": ("resnet101-63fe2227.pth", "resnet101-cd907fc2.pth"),
    "resnet152": ("resnet152-394f9c45.pth", "resnet152-f82ba261.pth"),
    "wide_resnet50_2": ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth"),
    "wide_resnet101_2": ("wide_resnet101_2-32ee1156.pth", "wide_resnet101_2-d733dc28.pth"),
    "resnext50_32x4d": ("resnext50_32x4d-7cdf4587.pth", "resnext50_32x4d-1a0047aa.pth"),
    "resnext101_32x8d": ("resnext101_32x8d-8ba56ff5.pth", "resnext101_32x8d-110c445d.pth"),
    "resnext101_64x4d": ("resnext101_64x4d-173b62eb.pth",),
}
IMAGENET_CLASSES = 1000


class PretrainedNotFound(FileNotFoundError):
    """Pretrained weights were asked for and are not on this machine; the message says where we looked."""


def hub_checkpoints_dir() -> Path:
    """torch.hub's download folder, computed as torch does ($TORCH_HOME, else $XDG_CACHE_HOME/torch)."""
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def find_weights(arch: str, where: str | os.PathLike[str] | None = None) -> Path | None:
    """The weights file for `arch`: `where` itself when it is a file, else torchvision's file names in
    `where` (a folder) or the hub cache. None when there is none."""
    if where is not None and Path(where).is_file():
        return Path(where)
    folder = Path(where) if where is not None else hub_checkpoints_dir()
    for name in TORCHVISION_FILES.get(arch, ()):
        if (folder / name).is_file():
            return folder / name
    return None


def require_weights(arch: str, where: str | os.PathLike[str] | None = None) -> Path:
    found = find_weights(arch, where)
    if found is None:
        looked = Path(where) if where is not None else hub_checkpoints_dir()
        names = ", ".join(TORCHVISION_FILES.get(arch, ())) or f"(torchvision publishes no weights for {arch})"
        raise PretrainedNotFound(
            f"--pretrained: no torchvision weights for {arch} at {looked} (expected one of: {names}). "
            "This tool never downloads; fetch them once on a connected machine, e.g. "
            f"`python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='DEFAULT')\"`, "
            "and copy the file there, or pass its path."
        )
    return found


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A torchvision checkpoint is a bare state_dict of tensors: weights_only=True loads it without pickle."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # also accept our own model.pt
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: not a state_dict")
    return state


def init_from_pretrained(model: Any, state: dict[str, Any]) -> list[str]:
    """Load `state` into `model`. The classifier (fc.*) is kept only when its shape matches (same classes):
    fine-tuning to other classes keeps the freshly initialised head. Every other key must match exactly.
    Returns the names of the parameters left at their initial values."""
    own = model.state_dict()
    head = {k for k in state if k.startswith("fc.")}
    if any(k not in own or own[k].shape != state[k].shape for k in head):
        state = {k: v for k, v in state.items() if k not in head}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith("fc.")]
    if bad_missing or unexpected:
        raise ValueError(
            f"pretrained weights do not fit this model: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
        )
    return list(missing)
