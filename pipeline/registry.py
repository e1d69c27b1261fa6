"""The register stage: every trained model becomes an MLflow registered version with a model card; the
`champion` alias moves only to a version that beats the current champion on the same data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.data.transforms import MEAN, STD


class InferenceModel(nn.Module):
    """What the registry stores: float32 pixels in [0, 255], (N, 3, crop, crop) after the eval resize +
    center crop -> class probabilities (N, num_classes). Normalisation lives inside the model so a
    serving client only resizes and crops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std  # (N, 3, H, W)
        logits = self.model(x)  # (N, C)
        return logits.softmax(dim=1)


def dataset_name(manifest: dict[str, Any]) -> str:
    layout = manifest["source"]["layout"]
    if layout == "synthetic":
        return "synthetic"
    if layout == "imagefolder":
        return "custom"
    return "imagenet" if int(manifest["num_classes"]) == 1000 else f"imagenet{manifest['num_classes']}"


def example_batch(shards_dir: str, resize: int, crop: int, n: int = 2) -> np.ndarray:
    """`n` real val images after the eval transform, float32 (n, 3, crop, crop): the input example.
    n >= 2 keeps the exported batch dimension dynamic (PITFALLS.md)."""
    import pyarrow.parquet as pq

    from pipeline.data.shards import shard_files
    from pipeline.data.transforms import val_image

    table = pq.read_table(shard_files(shards_dir, "val", verify=False)[0], columns=["image"])
    images = table.column("image").to_pylist()[:n]
    return np.stack([val_image(b, resize, crop) for b in images]).astype(np.float32)


def model_card(arch: str, meta: dict[str, Any], ev: dict[str, Any], dataset: str) -> str:
    from pipeline.evaluation import REFERENCE

    cfg = meta.get("config", {}).get("train", {})
    ref = REFERENCE.get(arch)
    ref_line = (f"ImageNet reference (torchvision V1, 1-crop): top-1 {ref['cheat_top1']} / top-5 "
                f"{ref['cheat_top5']}; paper (10-crop): {ref['paper_top1']} / {ref['paper_top5']}." if ref else "")
    synthetic = " (SYNTHETIC data: not comparable with ImageNet)" if dataset == "synthetic" else ""
    return "\n".join([
        f"# {arch} on {dataset}{synthetic}",
        f"- Metrics: top-1 error {ev['top1_err']:.2f}%, top-5 error {ev['top5_err']:.2f}% on {ev['n_images']} "
        f"val images ({ev['protocol']}), {ev['num_classes']} classes.",
        f"- Recipe: {meta.get('epochs_trained')} epochs, {cfg.get('opt')} lr {meta.get('config', {}).get('lr', '')} "
        f"batch {cfg.get('batch_size')}, {cfg.get('lr_scheduler')} schedule, amp {cfg.get('amp')}.",
        f"- Data fingerprint: {meta.get('data_fingerprint')}; git commit {meta.get('git_commit')}.",
        f"- Input: float32 pixels 0-255, (N, 3, {meta['eval_transform']['crop']}, {meta['eval_transform']['crop']})"
        f" after resize {meta['eval_transform']['resize']} + center crop; output: class probabilities.",
        f"- {ref_line}",
    ])


def decide_champion(new_err: float, new_fp: str, current: dict[str, str] | None) -> tuple[bool, str]:
    """Pure rule: (move the alias?, why). Better = strictly lower top-1 error on the same data."""
    if current is None:
        return True, "no champion yet"
    cur_fp = current.get("data_fingerprint", "")
    cur_err = float(current.get("top1_err", "inf"))
    if cur_fp != new_fp:
        return True, f"champion v{current.get('version')} was evaluated on other data ({cur_fp[:8]}); replaced"
    if new_err < cur_err:
        return True, f"top-1 {new_err:.2f}% beats champion v{current.get('version')} ({cur_err:.2f}%)"
    return False, f"top-1 {new_err:.2f}% does not beat champion v{current.get('version')} ({cur_err:.2f}%)"


def register_model(p: Params, arch: str, model_dir: str | Path, eval_path: str | Path) -> dict[str, Any]:
    from pipeline import tracking
    from pipeline.data.shards import read_manifest
    from pipeline.training.checkpoint import load_model_dir

    manifest = read_manifest(p.data.shards_dir)
    model, meta = load_model_dir(model_dir)
    ev = json.loads(Path(eval_path).read_text())
    dataset = dataset_name(manifest)
    name = p.registry.model_name.format(arch=arch, dataset=dataset)
    fp = str(manifest["fingerprint"])
    run_id = tracking.start_run(p.tracking.experiment, f"register-{arch}",
                                tracking.base_tags("register", p.digest(), fp),
                                params={"arch": arch, "registered_name": name})
    tracking.log_metrics(run_id, {"top1_err": ev["top1_err"], "top5_err": ev["top5_err"]})
    tf = meta["eval_transform"]
    example = example_batch(p.data.shards_dir, tf["resize"], tf["crop"])
    version_tags = {"arch": arch, "dataset": dataset, "top1_err": f"{ev['top1_err']:.4f}",
                    "top5_err": f"{ev['top5_err']:.4f}", "data_fingerprint": fp,
                    "git_commit": str(meta.get("git_commit")), "n_val_images": str(ev["n_images"])}
    metadata = {"classes": meta["classes"], "class_names": meta.get("class_names", {}), "eval_transform": tf,
                "arch": arch, "dataset": dataset}
    version = tracking.log_and_register_model(
        run_id, InferenceModel(model).eval(), example, name, model_card(arch, meta, ev, dataset),
        version_tags, metadata,
    )
    current = tracking.alias_version(name, p.registry.alias)
    current_tags = None if current is None else {**current.tags, "version": str(current.version)}
    move, why = decide_champion(ev["top1_err"], fp, current_tags)
    if move:
        tracking.set_alias(name, p.registry.alias, version)
    tracking.set_tags(run_id, {"registered.version": version, "champion.moved": str(move), "champion.why": why})
    tracking.end_run(run_id)
    return {"arch": arch, "name": name, "version": version, "alias": p.registry.alias if move else None,
            "champion_moved": move, "why": why, "top1_err": ev["top1_err"], "run_id": run_id,
            "uri": f"models:/{name}/{version}"}
