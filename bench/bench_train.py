"""train_loop_vs_bare_torch and bf16_vs_fp32_cpu: training throughput of our Ray Train loop over a bare PyTorch
loop, and of bf16 autocast over fp32 on CPU, measured side by side in one process.

Data: the embedded default's synthetic set (params.yaml `data.synthetic`: 10 classes x 80 train images, 48 px)
generated with `generate_synthetic_imagenet` and prepared with `prepare_shards` into a temp dir, with
params.yaml's max_side / rows_per_shard.

train_loop_vs_bare_torch
(a) ours: `init_ray()`, `make_job`, `build_trainer`, `run`: params.yaml exactly as the embedded default trains
    (resnet18; 2 Ray Train workers x 1 CPU, gloo DDP; global batch 64; 32 px RandomResizedCrop; bf16 autocast;
    channels_last; SGD; Ray Data ingest), with only data.shards_dir, train.epochs and train.storage_path set.
(b) baseline: one process, torch.set_num_threads(cores) (= the 2 threads of (a)'s 2 x 1-thread workers), the
    same model builder, optimizer, LR schedule, loss, AMP, channels_last and global batch; it reads the same
    shards with pyarrow and decodes every batch inline with the same `train_image`, no DataLoader.
Throughput is the loop's own per-epoch `images_per_s` (train steps only, validation excluded; it includes time
blocked on data) for (a), and images over the same span for (b). Epoch 1 of every fit is excluded for both
(Ray start-up, worker-group start, Ray Data's first execution, allocator warm-up); the wall time of each fit,
start-up and validation included, is recorded in extra keys so nobody is misled. Fits alternate
(ours, bare, bare, ours, ...); each timed epoch of ours is paired with the same epoch of the adjacent bare run,
and n_runs counts those pairs.

bf16_vs_fp32_cpu
The bare loop's images/s with `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32, resnet18 (the record)
and resnet50 (extra key) at 32 px, batch 64, alternating, first epoch (resp. first steps) excluded.

    python -m bench.bench_train [--quick]     # prints the records as JSON
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load1, median_spread, paired_ratios, record

ROOT = Path(__file__).resolve().parents[1]
ARCH = "resnet18"
EPOCHS = 4  # per fit: 1 warm-up + 3 timed
FITS = 2  # Ray fits (and bare runs) in the full run; the quick run does 1
# bf16 vs fp32: epochs of resnet18 per (dtype, repetition), steps per epoch of resnet50 (it is ~4x slower).
AMP_REPS = 3
R50_STEPS = 4


def default_params(tmpdir: Path, epochs: int, extra: tuple[str, ...] = ()) -> Any:
    """params.yaml as the embedded default trains, pointed at the benchmark's temp dir."""
    from pipeline.config import load_params, with_absolute_paths

    overrides = (
        f"data.shards_dir={tmpdir / 'shards'}",
        f"train.storage_path={tmpdir / 'ray_results'}",
        f"train.epochs={epochs}",
        *extra,
    )
    return with_absolute_paths(load_params(ROOT / "params.yaml", overrides), ROOT)


def make_shards(tmpdir: Path, p: Any) -> dict[str, Any]:
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.synthetic import generate_synthetic_imagenet

    syn = p.data.synthetic
    raw = tmpdir / "raw"
    generate_synthetic_imagenet(
        raw, num_classes=syn.num_classes, train_per_class=syn.train_per_class, val_per_class=syn.val_per_class,
        image_size=syn.image_size, seed=p.seed, workers=p.data.workers,
    )
    return prepare_shards(
        raw, p.data.shards_dir, source="synthetic", max_side=p.data.max_side, jpeg_quality=p.data.jpeg_quality,
        rows_per_shard=p.data.rows_per_shard, workers=p.data.workers, max_rejected=0, progress=False,
    )


# ------------------------------------------------------------------------------------------------ ours


def ray_fit(p: Any, tag: str) -> dict[str, Any]:
    """One TorchTrainer fit through the library; returns per-epoch history and the wall time."""
    from pipeline.training.trainer import build_trainer, init_ray, make_job, run

    t0 = time.perf_counter()
    init_ray()
    job = make_job(p, ARCH, p.train.lr, p.train.lr_warmup_epochs, p.train.epochs, None)
    # A fresh run name every time: a reused (storage_path, name) silently resumes (PITFALLS.md).
    name = f"bench-{tag}-{time.time_ns()}"
    trainer = build_trainer(job, p, name=name, num_workers=p.train.num_workers, storage_path=p.train.storage_path)
    outcome = run(trainer)
    wall = time.perf_counter() - t0
    history = outcome.history
    return {
        "images_per_s": [h["images_per_s"] for h in history],
        # Fraction of the train steps' time spent blocked on the input pipeline, per epoch.
        "data_wait_frac": [
            h["data_wait_s"] / max(h["epoch_time_s"] - h["val_time_s"], 1e-9) for h in history
        ],
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------------------------ bare


def load_train_rows(shards_dir: str) -> tuple[list[bytes], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import shard_files

    table = pa.concat_tables(pq.read_table(f, columns=["image", "label"]) for f in shard_files(shards_dir, "train"))
    return table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64)


def bare_fit(
    p: Any, arch: str, epochs: int, amp: str, *, max_steps: int | None = None, threads: int | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """A plain single-process PyTorch loop with our model, optimizer, schedule, loss and transforms.

    Returns images/s per epoch (train steps only, the decode of each batch included) and the wall time from
    reading the shards to the end of the last epoch."""
    import torch
    from torch import nn

    from pipeline.data.shards import read_manifest
    from pipeline.data.transforms import normalize, train_image
    from pipeline.models import build_model
    from pipeline.training.loop import model_kwargs
    from pipeline.training.optim import build_optimizer
    from pipeline.training.schedule import lr_at

    t_start = time.perf_counter()
    tp = p.train
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(p.seed)
    images, labels = load_train_rows(p.data.shards_dir)
    num_classes = num_classes or int(read_manifest(p.data.shards_dir)["num_classes"])
    memory_format = torch.channels_last if tp.channels_last else torch.contiguous_format
    model = build_model(arch, num_classes=num_classes, **model_kwargs(p, arch)).to(memory_format=memory_format)
    optimizer = build_optimizer(model, tp, tp.lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    rng = np.random.default_rng(p.seed)
    batch = tp.batch_size
    steps = len(images) // batch  # drop_last, like ours
    if max_steps is not None:
        steps = min(steps, max_steps)
    rates = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        t0 = time.perf_counter()
        seen = 0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            x = torch.from_numpy(np.stack([train_image(images[i], tp.train_crop_size, rng, tp.train_crop_min_scale)
                                           for i in idx]))  # (N, 3, crop, crop) uint8
            y = torch.from_numpy(labels[idx])
            lr = lr_at(
                epoch * steps + step, base_lr=tp.lr, steps_per_epoch=steps, epochs=epochs,
                warmup_epochs=min(tp.lr_warmup_epochs, epochs - 1), warmup_decay=tp.lr_warmup_decay,
                scheduler=tp.lr_scheduler, step_size=tp.lr_step_size, gamma=tp.lr_gamma, min_lr=tp.lr_min,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalize(x, tp.channels_last)
            with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            float(loss.detach())  # the loss is read every step, as any loop that logs it does
            seen += len(idx)
        rates.append(seen / (time.perf_counter() - t0))
    return {"images_per_s": rates, "wall_s": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------ records


def cpu_bf16_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none (bf16 is emulated)"


def train_loop_record(tmpdir: Path, quick: bool) -> dict[str, Any]:
    p = default_params(tmpdir, EPOCHS)
    fits = 1 if quick else FITS
    load_before = load1()
    ours: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    for i in range(fits):
        pair = ("ours", "bare") if i % 2 == 0 else ("bare", "ours")
        for who in pair:
            if who == "ours":
                ours.append(ray_fit(p, f"loop{i}"))
            else:
                bare.append(bare_fit(p, ARCH, EPOCHS, p.train.amp))
    what_if = None
    if not quick:
        # Where the gap goes: the same loop as 1 worker x 2 CPUs (no DDP all-reduce, no gloo).
        p1 = default_params(tmpdir, EPOCHS, ("train.num_workers=1", "train.cpus_per_worker=2"))
        what_if = ray_fit(p1, "loop-1worker")
    ours_steady = [r for fit in ours for r in fit["images_per_s"][1:]]
    bare_steady = [r for fit in bare for r in fit["images_per_s"][1:]]
    ratios = paired_ratios(ours_steady, bare_steady)
    value, value_spread = median_spread(ours_steady)
    base, base_spread = median_spread(bare_steady)
    tp = p.train
    extra: dict[str, Any] = {
        "setup": (
            f"{ARCH}, {tp.train_crop_size} px crops of {p.data.synthetic.image_size} px synthetic images, global "
            f"batch {tp.batch_size}, amp {tp.amp}, channels_last {tp.channels_last}; ours: {tp.num_workers} Ray "
            f"Train workers x {tp.cpus_per_worker:g} CPU (init_ray sizing); bare: 1 process, "
            f"{os.cpu_count()} threads"
        ),
        "fits": fits,
        "epochs_per_fit": EPOCHS,
        "timed": "epochs 2..N of every fit; n_runs = paired timed epochs",
        "value_spread": [round(v, 1) for v in value_spread],
        "baseline_spread": [round(v, 1) for v in base_spread],
        "wall_s_incl_startup": {
            "ours": [round(f["wall_s"], 1) for f in ours],
            "baseline": [round(f["wall_s"], 1) for f in bare],
            "note": "ours includes Ray/worker start-up, per-epoch validation and checkpoints; baseline neither",
        },
        "ours_data_wait_frac": round(statistics.median(d for f in ours for d in f["data_wait_frac"][1:]), 3),
    }
    if what_if is not None:
        steady = what_if["images_per_s"][1:]
        extra["what_if_1worker_2cpus"] = {
            "img_s": round(statistics.median(steady), 1),
            "ratio": round(statistics.median(steady) / base, 3),
            "data_wait_frac": round(statistics.median(what_if["data_wait_frac"][1:]), 3),
            "wall_s": round(what_if["wall_s"], 1),
        }
    return record(
        "train_loop_vs_bare_torch", value, "img/s", "bare_pytorch_loop", base, len(ratios),
        [min(ratios), max(ratios)], load_before=load_before, **extra,
    )


def _amp_pair(p: Any, arch: str, epochs: int, max_steps: int | None, reps: int) -> dict[str, list[float]]:
    """Steady images/s (epochs after the first) of bf16 and fp32, alternating which goes first."""
    rates: dict[str, list[float]] = {"bf16": [], "off": []}
    for rep in range(reps):
        for amp in ("bf16", "off") if rep % 2 == 0 else ("off", "bf16"):
            fit = bare_fit(p, arch, epochs, amp, max_steps=max_steps)
            rates[amp].append(statistics.median(fit["images_per_s"][1:]))
    return rates


def amp_record(tmpdir: Path, quick: bool) -> dict[str, Any]:
    p = default_params(tmpdir, EPOCHS)
    reps = AMP_REPS
    load_before = load1()
    r18 = _amp_pair(p, ARCH, 2, None, reps)
    r50 = _amp_pair(p, "resnet50", 2, 2 if quick else R50_STEPS, reps)
    value, _ = median_spread(r18["bf16"])
    base, _ = median_spread(r18["off"])
    ratios = paired_ratios(r18["bf16"], r18["off"])
    r50_ratios = paired_ratios(r50["bf16"], r50["off"])
    r50_ratio = statistics.median(r50["bf16"]) / statistics.median(r50["off"])
    supports = "bf16" if value > base and r50_ratio > 1 else ("off" if value < base and r50_ratio < 1 else "mixed")
    return record(
        "bf16_vs_fp32_cpu", value, "img/s", "fp32_cpu", base, reps, [min(ratios), max(ratios)],
        load_before=load_before,
        setup=(
            f"bare loop (decode inline), {ARCH}, {p.train.train_crop_size} px, batch {p.train.batch_size}, "
            f"channels_last {p.train.channels_last}, {os.cpu_count()} threads; epoch 2 of 2 timed"
        ),
        cpu_bf16=cpu_bf16_flags(),
        resnet50={
            "value": round(statistics.median(r50["bf16"]), 1),
            "baseline_value": round(statistics.median(r50["off"]), 1),
            "ratio": round(r50_ratio, 3),
            "spread": [round(min(r50_ratios), 3), round(max(r50_ratios), 3)],
            "timed": f"epoch 2 of 2, {2 if quick else R50_STEPS} steps each",
        },
        supports_default=(
            f"params.yaml train.amp: {p.train.amp}; this measurement supports amp={supports} on this CPU"
        ),
    )


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    import ray
    import torch

    tmpdir = Path(tmpdir)
    make_shards(tmpdir, default_params(tmpdir, EPOCHS))
    started_ray = not ray.is_initialized()
    threads = torch.get_num_threads()  # bare_fit sets it; give the caller's back
    try:
        records = [train_loop_record(tmpdir, quick)]
        records.append(amp_record(tmpdir, quick))
    finally:
        torch.set_num_threads(threads)
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return records


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        out = run(Path(tmp), quick="--quick" in sys.argv[1:])
    json.dump(out, sys.stdout, indent=2)
    print()
