"""tune/best.json, read by training: which tuned lr an arch takes, rescaled to its batch (the transfer rule of
pipeline.archs, the linear scaling rule of pipeline.training.schedule). The tune stage writes the file
(pipeline.tuning); keeping the reader here lets training depend on the format without importing Ray Tune's driver.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.archs import lr_source_arch, network_kind
from pipeline.training.schedule import scale_lr

BEST_VERSION = 2  # 2: one entry per tuned arch under "archs", the split that selected them


def tuned_lr_for(best_path: Path, arch: str, batch_size: int, epochs: int) -> tuple[float, int, dict[str, Any]]:
    """(lr, warmup, provenance) for `arch` from tune/best.json: the transfer rule's source entry, its lr rescaled
    from the trial's global batch to `batch_size` (linear rule), the warmup capped below `epochs`. Raises
    ValueError naming the file for an old-format file or a kind nobody tuned."""
    best = json.loads(Path(best_path).read_text())
    if best.get("version") != BEST_VERSION or "archs" not in best:
        raise ValueError(f"{best_path} was written by an older tune stage (no per-arch entries): rerun the tune "
                         "stage (`dvc repro tune`)")
    source = lr_source_arch(arch, list(best["archs"]))
    if source is None:
        raise ValueError(f"{best_path} tunes {sorted(best['archs'])}, none of the kind of {arch} "
                         f"({'/'.join(network_kind(arch))}): add such an arch to tune.archs and rerun the tune stage, "
                         "or set train.use_tuned: false")
    entry = best["archs"][source]
    lr = scale_lr(float(entry["lr"]), int(entry["batch_size"]), batch_size)
    warmup = min(int(entry["lr_warmup_epochs"]), max(epochs - 1, 0))
    provenance = {
        "from": str(best_path), "tuned_arch": source,
        "rule": "own search" if source == arch else f"transferred: same kind {'/'.join(network_kind(arch))}, "
                                                    "nearest tuned depth",
        "selected_on": best.get("selected_on"), "selection_images": best.get("selection_images"),
        "tuned_lr": float(entry["lr"]), "tuned_batch_size": int(entry["batch_size"]),
        "tuned_lr_warmup_epochs": int(entry["lr_warmup_epochs"]),
        "selection_top1_err": entry.get("selection_top1_err"), "batch_size": batch_size, "lr": lr,
        "scaled": "no" if int(entry["batch_size"]) == batch_size else
                  f"linear rule x {batch_size}/{int(entry['batch_size'])}",
    }
    return lr, warmup, provenance
