"""tune/best.json, read by training: which tuned lr an arch takes and at what rate for its batch (the transfer rule
of pipeline.archs; the search is in lr per 256 images, so the rate is that value x batch / 256, the linear scaling
rule). The tune stage writes the file (pipeline.tuning); keeping the reader here lets training depend on the
format without importing Ray Tune's driver. `trial_recipe` (how a trial compresses the final schedule) lives
here too: the search's identity (pipeline.training.identity) needs it without importing the driver.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.archs import lr_source_arch, network_kind
from pipeline.config import TrainParams

# 3: lr searched per 256 images (`lr_per_256`), trials a compressed schedule (`trial_epochs`, whether warmup was
# searched); a stub with `"used": false` when no train stage takes tuned params.
BEST_VERSION = 3


def lr_for_batch(lr_per_256: float, batch_size: int) -> float:
    """The rate for a global batch from an lr per 256 images (linear scaling rule, Goyal et al. 2017)."""
    return lr_per_256 * batch_size / 256


def share_of_epochs(epochs: int, of_epochs: int, to_epochs: int) -> int:
    """`epochs` of a schedule `of_epochs` long as the same share of one `to_epochs` long, rounded half up and
    capped below `to_epochs` (a warmup must leave at least one epoch of decay)."""
    if epochs <= 0:
        return 0
    return min(math.floor(epochs * to_epochs / of_epochs + 0.5), max(to_epochs - 1, 0))


def trial_recipe(train: TrainParams, arch: str, tune_epochs: int) -> tuple[dict[str, Any], int]:
    """(train.* overrides of a trial of `arch`, its warmup when warmup is not searched): the final run's schedule
    compressed from train.epochs_for(arch) onto `tune_epochs`. Cosine already decays over the trial's epochs; the
    step schedule's lr_step_size and the warmup keep their share of the run (the step at least 1 epoch). EMA off,
    so a trial is scored on its own weights; validation every epoch, so every ASHA rung has a score."""
    final = train.epochs_for(arch)
    step = train.lr_step_size
    # Only the step schedule's drops are in epochs (cosine needs nothing, so train.epochs leaves its trials alone):
    # the same share of the run, widened until the trial has no more drops than the run (90 epochs, x0.1 every
    # 30: two drops; onto 16 epochs: every 6, not every 5, which would add a third at epoch 15).
    if train.lr_scheduler == "step":
        drops = (final - 1) // step
        step = max(1, math.floor(step * tune_epochs / final + 0.5))
        while (tune_epochs - 1) // step > drops:
            step += 1
    warmup = share_of_epochs(train.lr_warmup_epochs, final, tune_epochs)
    return {"lr_step_size": step, "model_ema_decay": 0.0, "val_every_epochs": 1}, warmup


def tuned_lr_for(best_path: Path, arch: str, batch_size: int, epochs: int,
                 recipe_warmup: int | None = None) -> tuple[float, int, dict[str, Any]]:
    """(lr, warmup, provenance) for `arch` from tune/best.json: the transfer rule's source entry, its lr per 256
    images at `batch_size`; the warmup is the searched one as the same share of `epochs` as of the trial's, or
    `recipe_warmup` (train.lr_warmup_epochs) when the search left warmup alone. Raises ValueError naming the file
    for an old-format file, a stub (no train stage used tuning when it was written) or a kind nobody tuned."""
    best = json.loads(Path(best_path).read_text())
    if best.get("version") != BEST_VERSION or "archs" not in best:
        raise ValueError(f"{best_path} was written by an older tune stage (no per-arch lr per 256 images): rerun "
                         "the tune stage (`dvc repro tune`)")
    if best.get("used") is False:
        raise ValueError(f"{best_path} is the tune stage's stub (written while train.use_tuned was false, so no "
                         "search ran): rerun the tune stage with train.use_tuned: true (`dvc repro tune`)")
    source = lr_source_arch(arch, list(best["archs"]))
    if source is None:
        raise ValueError(f"{best_path} tunes {sorted(best['archs'])}, none of the kind of {arch} "
                         f"({'/'.join(network_kind(arch))}): add such an arch to tune.archs and rerun the tune stage, "
                         "or set train.use_tuned: false")
    entry = best["archs"][source]
    trial_batch = int(entry["batch_size"])
    lr = lr_for_batch(float(entry["lr_per_256"]), batch_size)
    trial_warmup, trial_epochs = int(entry["lr_warmup_epochs"]), int(entry["trial_epochs"])
    if entry.get("lr_warmup_searched", True):
        warmup = share_of_epochs(trial_warmup, trial_epochs, epochs)
        warmup_rule = f"searched: {trial_warmup} of {trial_epochs} trial epochs -> {warmup} of {epochs}"
    else:
        if recipe_warmup is None:
            raise ValueError(f"{best_path}: the search of {source} did not tune warmup; pass the recipe's "
                             "train.lr_warmup_epochs")
        warmup = min(int(recipe_warmup), max(epochs - 1, 0))
        warmup_rule = "train.lr_warmup_epochs (not searched)"
    provenance = {
        "from": str(best_path), "tuned_arch": source,
        "rule": "own search" if source == arch else f"transferred: same kind {'/'.join(network_kind(arch))}, "
                                                    "nearest tuned depth",
        "selected_on": best.get("selected_on"), "selection_images": best.get("selection_images"),
        "tuned_lr_per_256": float(entry["lr_per_256"]),
        "tuned_lr": float(entry["lr"]), "tuned_batch_size": trial_batch,
        "tuned_lr_warmup_epochs": trial_warmup, "tuned_trial_epochs": trial_epochs, "warmup_rule": warmup_rule,
        "selection_top1_err": entry.get("selection_top1_err"), "batch_size": batch_size, "lr": lr,
        "scaled": "no" if trial_batch == batch_size else f"linear rule x {batch_size}/{trial_batch}",
    }
    return lr, warmup, provenance
