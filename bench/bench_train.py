"""train_loop_vs_bare_torch, train_epoch_vs_bare_torch and bf16_vs_fp32_cpu: training throughput of our Ray Train
loop over a bare PyTorch loop (train steps alone, and whole epochs with our validation and checkpoint), and of
bf16 autocast over fp32 on CPU, measured side by side in one process.

Data: the embedded default's synthetic set (params.yaml `data.synthetic`: 10 classes, 48 px) with TRAIN_PER_CLASS
train images per class, generated with `generate_synthetic_imagenet` and prepared with `prepare_shards` into a
temp dir, with params.yaml's max_side / rows_per_shard.

train_loop_vs_bare_torch
(a) ours: `init_ray()`, `make_job`, `build_trainer`, `run`: params.yaml exactly as the embedded default trains
    (resnet18; 1 Ray Train worker x 2 CPUs; global batch 64; 32 px RandomResizedCrop; fp32; channels_last; SGD;
    Ray Data ingest), with only data.shards_dir, train.epochs and train.storage_path set.
(b) baseline: one process, torch.set_num_threads(cores) (= the 2 threads of (a)'s 1 x 2-thread worker), the
    same model builder, optimizer, LR schedule, loss, gradient clipping, AMP, channels_last and global batch; it
    reads the same shards with pyarrow and decodes every batch inline with the same `train_image`, no DataLoader.
Throughput is the loop's own per-epoch `images_per_s` (train steps only, validation excluded; it includes time
blocked on data) for (a), and images over the same span for (b). Epoch 1 of every fit is excluded for both
(Ray start-up, worker-group start, Ray Data's first execution, allocator warm-up); the wall time of each fit,
start-up and validation included, is recorded in extra keys so nobody is misled. Fits alternate
(ours, bare, bare, ours, ...); each timed epoch of ours is paired with the same epoch of the adjacent bare run,
and n_runs counts those pairs. The full run adds a what-if fit in an extra key: the same loop as 1 worker x 2
CPUs or, when that is the default, 2 gloo DDP workers x 1 CPU, to show what the other way to spend the cores
costs (with ours' share of time blocked on data).

bf16_vs_fp32_cpu
The bare loop's images/s with `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32, resnet18 (the record)
and resnet50 (extra key) at 32 px, batch 64. The two models take training steps in turns (bf16, fp32, fp32,
bf16, ...) on the same batches, so that bursts of other people's work on a shared machine hit both alike;
images/s = batch / median step time, warm-up steps excluded; `spread` is over the per-pair ratios. Why steps in
turns and not whole epochs: with 2 intra-op threads on 2 busy cores, one descheduled OpenMP thread stalls every
parallel region, and step times swing by 10x within seconds (seen while writing this benchmark).

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
# Train images per class (x 10 classes). The embedded default's 80 make an epoch of 12 steps, in which Ray Data's
# per-epoch start-up (~0.2-0.4 s to the first batch, measured: a new streaming execution every epoch) is ~15% of
# the epoch; an ImageNet epoch has 5,000 steps. 320 (50 steps, ~8 s an epoch) measures the loop's steady state;
# the start-up is recorded apart (`ours_first_batch_wait_s`, `whole_epoch_ratio`); the quick run keeps 80.
TRAIN_PER_CLASS = 320
QUICK_TRAIN_PER_CLASS = 80
FITS = 2  # Ray fits (and bare runs) in the full run; the quick run does 1
# bf16 vs fp32: timed step pairs per model (halved by --quick), after warm-up steps.
AMP_WARMUP_STEPS = 2
R18_STEPS = 10
R50_STEPS = 5


def default_params(tmpdir: Path, epochs: int, extra: tuple[str, ...] = (), quick: bool = False) -> Any:
    """params.yaml as the embedded default trains, pointed at the benchmark's temp dir, with TRAIN_PER_CLASS."""
    from pipeline.config import load_params, with_absolute_paths

    overrides = (
        f"data.shards_dir={tmpdir / 'shards'}",
        f"data.synthetic.train_per_class={QUICK_TRAIN_PER_CLASS if quick else TRAIN_PER_CLASS}",
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
    from pipeline.runtime import init_ray
    from pipeline.training.trainer import build_trainer, make_job, run

    t0 = time.perf_counter()
    init_ray()
    job = make_job(p, ARCH, p.train.lr, p.train.lr_warmup_epochs, p.train.epochs, None)
    # A fresh run name every time: a reused (storage_path, name) silently resumes.
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
        "first_batch_s": [h["data_first_batch_s"] for h in history],
        "epoch_time_s": [h["epoch_time_s"] for h in history],  # train steps + validation + checkpoint
        "val_time_s": [h["val_time_s"] for h in history],
        "wall_s": wall,
    }


# ------------------------------------------------------------------------------------------------ bare


def load_train_rows(shards_dir: str) -> tuple[list[bytes], np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.shards import shard_files

    table = pa.concat_tables(pq.read_table(f, columns=["image", "label"]) for f in shard_files(shards_dir, "train"))
    return table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64)


class BareLoop:
    """A plain single-process PyTorch training step with our model, optimizer, loss, transforms and AMP."""

    def __init__(
        self, p: Any, arch: str, amp: str, images: list[bytes], labels: np.ndarray, num_classes: int, seed: int = 0
    ) -> None:
        import torch
        from torch import nn

        from pipeline.models import build_model
        from pipeline.training.loop import model_kwargs
        from pipeline.training.optim import build_optimizer

        self.tp = p.train
        self.images, self.labels = images, labels
        torch.manual_seed(p.seed + seed)
        self.memory_format = torch.channels_last if self.tp.channels_last else torch.contiguous_format
        self.model = build_model(arch, num_classes=num_classes, **model_kwargs(p, arch)).to(
            memory_format=self.memory_format
        )
        self.model.train()
        self.optimizer = build_optimizer(self.model, self.tp, self.tp.lr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.tp.label_smoothing)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
        self.rng = np.random.default_rng(p.seed + seed)

    def step(self, idx: np.ndarray, lr: float) -> None:
        """One step on rows `idx`: decode + augment inline, normalise, forward, backward, update."""
        import torch
        from torch import nn

        from pipeline.data.transforms import normalize, train_image

        tp = self.tp
        x = torch.from_numpy(
            np.stack([train_image(self.images[i], tp.train_crop_size, self.rng, tp.train_crop_min_scale) for i in idx])
        )  # (N, 3, crop, crop) uint8
        y = torch.from_numpy(self.labels[idx])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x = normalize(x, tp.channels_last)
        with torch.autocast("cpu", dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tp.clip_grad_norm:  # the recipe's clipping (params.yaml), as our loop does it
            nn.utils.clip_grad_norm_(self.model.parameters(), tp.clip_grad_norm)
        self.optimizer.step()
        float(loss.detach())  # read every step, as any loop that logs its loss does


def bare_fit(p: Any, arch: str, epochs: int, amp: str, threads: int | None = None) -> dict[str, Any]:
    """Full epochs of BareLoop with our LR schedule: images/s per epoch (train steps only, decode included) and
    the wall time from reading the shards to the end of the last epoch."""
    import torch

    from pipeline.data.shards import read_manifest
    from pipeline.training.schedule import lr_at

    t_start = time.perf_counter()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    images, labels = load_train_rows(p.data.shards_dir)
    loop = BareLoop(p, arch, amp, images, labels, int(read_manifest(p.data.shards_dir)["num_classes"]))
    tp = p.train
    batch = tp.batch_size
    steps = len(images) // batch  # drop_last, like ours
    rates = []
    for epoch in range(epochs):
        order = loop.rng.permutation(len(images))
        t0 = time.perf_counter()
        for step in range(steps):
            lr = lr_at(
                epoch * steps + step, base_lr=tp.lr, steps_per_epoch=steps, epochs=epochs,
                warmup_epochs=min(tp.lr_warmup_epochs, epochs - 1), warmup_decay=tp.lr_warmup_decay,
                scheduler=tp.lr_scheduler, step_size=tp.lr_step_size, gamma=tp.lr_gamma, min_lr=tp.lr_min,
            )
            loop.step(order[step * batch : (step + 1) * batch], lr)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {"images_per_s": rates, "wall_s": time.perf_counter() - t_start}


def interleaved_steps(p: Any, arch: str, amps: tuple[str, str], warmup: int, timed: int) -> dict[str, list[float]]:
    """Step times of two BareLoops (one per AMP setting) run in turns, step by step, so that both see the same
    machine: on a shared 2-core machine other jobs come and go within seconds. Warm-up steps are dropped."""
    import torch

    from pipeline.data.shards import read_manifest

    torch.set_num_threads(os.cpu_count() or 1)
    images, labels = load_train_rows(p.data.shards_dir)
    n_classes = int(read_manifest(p.data.shards_dir)["num_classes"])
    loops = {amp: BareLoop(p, arch, amp, images, labels, n_classes) for amp in amps}
    lr = p.train.lr * p.train.lr_warmup_decay  # a small constant LR: throughput does not depend on it
    batch = p.train.batch_size
    times: dict[str, list[float]] = {amp: [] for amp in amps}
    rng = np.random.default_rng(p.seed)
    for i in range(warmup + timed):
        idx = rng.choice(len(images), batch, replace=False)
        for amp in amps if i % 2 == 0 else amps[::-1]:
            t0 = time.perf_counter()
            loops[amp].step(idx, lr)
            if i >= warmup:
                times[amp].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------------------------ records


def cpu_bf16_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo", encoding="utf-8") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(found) or "none (bf16 is emulated)"


def train_loop_record(tmpdir: Path, quick: bool) -> list[dict[str, Any]]:
    p = default_params(tmpdir, EPOCHS, quick=quick)
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
    cores = os.cpu_count() or 2
    # The other way to spend the cores: 1 worker x all cores (no DDP all-reduce) vs one DDP worker per core.
    tp_single = p.train.num_workers == 1
    what_if_name = f"what_if_{cores}workers_1cpu" if tp_single else f"what_if_1worker_{cores}cpus"
    if not quick:
        sets = ((f"train.num_workers={cores}", "train.cpus_per_worker=1") if tp_single
                else ("train.num_workers=1", f"train.cpus_per_worker={cores}"))
        what_if = ray_fit(default_params(tmpdir, EPOCHS, sets, quick), "loop-what-if")
    ours_steady = [r for fit in ours for r in fit["images_per_s"][1:]]
    bare_steady = [r for fit in bare for r in fit["images_per_s"][1:]]
    ratios = paired_ratios(ours_steady, bare_steady)
    images_per_epoch = p.data.synthetic.num_classes * p.data.synthetic.train_per_class
    images_per_epoch -= images_per_epoch % p.train.batch_size  # drop_last, both loops
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
        # Ours' wait for each timed epoch's first batch: Ray Data's per-epoch start-up left after the loop starts
        # it behind the previous epoch's validation (loop.NextEpoch).
        "ours_first_batch_wait_s": round(statistics.median(w for f in ours for w in f["first_batch_s"][1:]), 3),
        # The whole epoch, validation of the val split and the checkpoint included (where the next epoch's
        # data start-up now runs), over the bare loop's epoch, which neither validates nor checkpoints.
        "whole_epoch_ratio": round(
            statistics.median(images_per_epoch / t for f in ours for t in f["epoch_time_s"][1:]) / base, 3
        ),
    }
    if what_if is not None:
        steady = what_if["images_per_s"][1:]
        extra[what_if_name] = {
            "img_s": round(statistics.median(steady), 1),
            "ratio": round(statistics.median(steady) / base, 3),
            "data_wait_frac": round(statistics.median(what_if["data_wait_frac"][1:]), 3),
            "wall_s": round(what_if["wall_s"], 1),
        }
    loop = record(
        "train_loop_vs_bare_torch", value, "img/s", "bare_pytorch_loop", base, len(ratios),
        [min(ratios), max(ratios)], load_before=load_before, **extra,
    )
    # The whole epoch: our train steps + validation (Ray Data val pipeline) + checkpoint, paired with the bare
    # loop's train steps alone over the same images (the bare loop neither validates nor checkpoints).
    ours_whole = [images_per_epoch / t for f in ours for t in f["epoch_time_s"][1:]]
    whole_ratios = paired_ratios(ours_whole, bare_steady)
    whole_value, whole_spread = median_spread(ours_whole)
    whole = record(
        "train_epoch_vs_bare_torch", whole_value, "img/s", "bare_pytorch_loop_train_steps", base,
        len(whole_ratios), [min(whole_ratios), max(whole_ratios)], load_before=load_before,
        setup=extra["setup"] + f"; ours' epoch = {images_per_epoch} train images + validation of "
        f"{p.data.synthetic.num_classes * p.data.synthetic.val_per_class} val images + checkpoint",
        value_spread=[round(v, 1) for v in whole_spread],
        median_of_paired_ratios=round(statistics.median(whole_ratios), 3),
        ours_val_time_s=round(statistics.median(v for f in ours for v in f["val_time_s"][1:]), 3),
        timed=extra["timed"],
    )
    return [loop, whole]


def amp_record(tmpdir: Path, quick: bool) -> dict[str, Any]:
    p = default_params(tmpdir, EPOCHS, quick=quick)
    batch = p.train.batch_size
    load_before = load1()
    out: dict[str, dict[str, Any]] = {}
    for arch, timed in ((ARCH, R18_STEPS), ("resnet50", R50_STEPS)):
        timed = max(3, timed // 2) if quick else timed
        times = interleaved_steps(p, arch, ("bf16", "none"), AMP_WARMUP_STEPS, timed)
        ratios = paired_ratios(times["none"], times["bf16"])  # (batch / t_bf16) / (batch / t_fp32)
        out[arch] = {
            "value": batch / statistics.median(times["bf16"]),
            "baseline": batch / statistics.median(times["none"]),
            "spread": [min(ratios), max(ratios)],
            "n": timed,
            # The fastest step of each: the least disturbed by other jobs (timeit's argument for the minimum).
            "best_step_img_s": {
                "bf16": round(batch / min(times["bf16"]), 1),
                "fp32": round(batch / min(times["none"]), 1),
            },
        }
    r18, r50 = out[ARCH], out["resnet50"]
    verdicts = [f"{arch}: {'bf16' if o['value'] > o['baseline'] else 'fp32'} faster ({o['value'] / o['baseline']:.2f}x)"
                for arch, o in out.items()]
    faster = [o["value"] > o["baseline"] for o in out.values()]
    supports = "bf16" if all(faster) else ("none" if not any(faster) else "bf16 only for some archs")
    return record(
        "bf16_vs_fp32_cpu", r18["value"], "img/s", "fp32_cpu", r18["baseline"], r18["n"], r18["spread"],
        load_before=load_before,
        setup=(
            f"bare loop (decode inline), {ARCH}, {p.train.train_crop_size} px crops, batch {batch}, channels_last "
            f"{p.train.channels_last}, {os.cpu_count()} threads; bf16 and fp32 models stepped in turns, "
            f"{AMP_WARMUP_STEPS} warm-up steps each dropped; images/s = batch / median step time; "
            "n_runs = timed step pairs"
        ),
        cpu_bf16=cpu_bf16_flags(),
        best_step_img_s=r18["best_step_img_s"],
        resnet50={
            "value": round(r50["value"], 1),
            "baseline_value": round(r50["baseline"], 1),
            "ratio": round(r50["value"] / r50["baseline"], 3),
            "spread": [round(v, 3) for v in r50["spread"]],
            "n_runs": r50["n"],
            "best_step_img_s": r50["best_step_img_s"],
        },
        supports_default=(
            f"params.yaml train.amp: {p.train.amp}; {'; '.join(verdicts)}: this measurement supports amp={supports} "
            "on this CPU (medians; see spread and best_step_img_s before trusting a ratio near 1)"
        ),
    )


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    import ray
    import torch

    tmpdir = Path(tmpdir)
    make_shards(tmpdir, default_params(tmpdir, EPOCHS, quick=quick))
    started_ray = not ray.is_initialized()
    threads = torch.get_num_threads()  # bare_fit sets it; give the caller's back
    try:
        records = train_loop_record(tmpdir, quick)
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
