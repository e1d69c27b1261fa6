"""Self-describing checkpoints: weights plus everything needed to rebuild, evaluate and trust them.

Everything stored is a tensor or a plain Python value, so every load uses `weights_only=True` (no pickled
code is ever executed from a checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.models import build_model
from pipeline.runtime import publish_dir, temp_dir_beside

TRAIN_STATE_FILE = "checkpoint.pt"  # inside a Ray Train checkpoint directory (resume state)
MODEL_FILE = "model.pt"  # inside models/ARCH/ (the trained model)
META_FILE = "meta.json"


def save_train_state(directory: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / TRAIN_STATE_FILE)


def load_train_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)


def export_model_dir(out_dir: str | Path, train_state: dict[str, Any]) -> Path:
    """Write models/ARCH/ atomically: model.pt (weights + description) and meta.json (the same
    description, human readable). The EMA weights win when EMA was on (that is what gets evaluated)."""
    out_dir = Path(out_dir)
    ema = train_state.get("ema")
    # pipeline.training.ema.EMA's state: {"weights", "updates", "decay"}; checkpoints before it held the
    # AveragedModel's state dict ("module."-prefixed keys plus "n_averaged").
    weights = (ema["weights"] if "weights" in ema else ema) if ema else train_state["model"]
    weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    keys = ("arch", "model_kwargs", "num_classes", "classes", "class_names", "eval_transform", "config",
            "git_commit", "data_fingerprint", "shards_dir", "history", "lr", "lr_warmup_epochs")
    meta = {k: train_state[k] for k in keys if k in train_state}
    meta["epochs_trained"] = train_state["epoch"]
    tmp = temp_dir_beside(out_dir)  # unique: two exports never write into one folder
    torch.save({"state_dict": weights, **meta}, tmp / MODEL_FILE)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    publish_dir(tmp, out_dir)
    return out_dir


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """models/ARCH/meta.json: the description without loading the weights."""
    file = Path(path) / META_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no trained model at {path} (run the train stage first)")
    return json.loads(file.read_text())


def load_model_dir(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """models/ARCH/ -> (model in eval mode, description)."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no trained model at {file} (run the train stage first)")
    blob = torch.load(file, map_location="cpu", weights_only=True)
    return model_from_blob(blob)


def model_from_blob(blob: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """{"state_dict", "arch", "num_classes", "model_kwargs", ...} (model.pt's content) -> (model in eval
    mode, the description without the weights)."""
    blob = dict(blob)
    model = build_model(blob["arch"], num_classes=blob["num_classes"], **blob.get("model_kwargs", {}))
    model.load_state_dict(blob.pop("state_dict"), strict=True)
    model.eval()
    return model, blob
