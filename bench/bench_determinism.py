"""deterministic_vs_default: what `train.deterministic: true` costs in training throughput, on the embedded
default's recipe (bench_train's data and params: resnet18, 32 px crops of the 48 px synthetic set, global batch
64, 1 Ray Train worker x 2 CPUs, fp32), and whether it delivers: the max abs difference of the final weights of
the deterministic fits (0 when bit-for-bit repeatable).

Fits alternate (deterministic, default, default, deterministic, ...), EPOCHS each; epoch 1 of every fit is
excluded (Ray start-up, the first Ray Data execution); each timed epoch of a deterministic fit is paired with the
same epoch of the adjacent default fit, and n_runs counts those pairs. Throughput is the loop's own per-epoch
`images_per_s` (train steps, time blocked on data included).

    python -m bench --only deterministic [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_train import ARCH, EPOCHS, default_params, make_shards
from bench.common import load1, median_spread, paired_ratios, record

FITS = 2  # of each kind in the full run; the quick run does 1


def fit(p: Any, tag: str) -> dict[str, Any]:
    import torch

    from pipeline.training.trainer import build_trainer, init_ray, make_job, run

    init_ray()
    job = make_job(p, ARCH, p.train.lr, p.train.lr_warmup_epochs, p.train.epochs, None)
    outcome = run(build_trainer(job, p, name=f"bench-{tag}-{time.time_ns()}", num_workers=p.train.num_workers,
                                storage_path=p.train.storage_path))
    weights = {k: v.detach().clone() for k, v in outcome.state["model"].items() if torch.is_floating_point(v)}
    return {"images_per_s": [h["images_per_s"] for h in outcome.history], "weights": weights}


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    import ray

    tmpdir = Path(tmpdir)
    base = default_params(tmpdir, EPOCHS, quick=quick)
    det = default_params(tmpdir, EPOCHS, ("train.deterministic=true",), quick=quick)
    make_shards(tmpdir, base)
    started_ray = not ray.is_initialized()
    load_before = load1()
    fits = 1 if quick else FITS
    ours: list[dict[str, Any]] = []
    default: list[dict[str, Any]] = []
    try:
        for i in range(fits):
            for who in (("det", "default") if i % 2 == 0 else ("default", "det")):
                if who == "det":
                    ours.append(fit(det, f"det{i}"))
                else:
                    default.append(fit(base, f"default{i}"))
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    ours_steady = [r for f in ours for r in f["images_per_s"][1:]]
    default_steady = [r for f in default for r in f["images_per_s"][1:]]
    ratios = paired_ratios(ours_steady, default_steady)
    value, value_spread = median_spread(ours_steady)
    baseline, base_spread = median_spread(default_steady)
    tp = base.train
    extra: dict[str, Any] = {
        "setup": (f"{ARCH}, {tp.train_crop_size} px crops, global batch {tp.batch_size}, amp {tp.amp}, "
                  f"{tp.num_workers} Ray Train worker x {tp.cpus_per_worker:g} CPU; deterministic = seeded rows, "
                  "Ray Data preserve_order, torch.use_deterministic_algorithms"),
        "fits": fits, "epochs_per_fit": EPOCHS,
        "timed": "epochs 2..N of every fit; n_runs = paired timed epochs",
        "value_spread": [round(v, 1) for v in value_spread],
        "baseline_spread": [round(v, 1) for v in base_spread],
    }
    if len(ours) > 1:
        extra["deterministic_weights_max_abs_diff"] = max_abs_diff(ours[0]["weights"], ours[1]["weights"])
    if len(default) > 1:
        extra["default_weights_max_abs_diff"] = max_abs_diff(default[0]["weights"], default[1]["weights"])
    return [record("deterministic_vs_default", value, "img/s", "default_nondeterministic", baseline, len(ratios),
                   [min(ratios), max(ratios)], load_before=load_before, **extra)]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_determinism-") as tmp:
        out = run(Path(tmp), quick="--quick" in sys.argv[1:])
    json.dump(out, sys.stdout, indent=2)
    print()
