"""ingest_vs_imagefolder: decoded + augmented train batches per second, our Parquet-shard Ray Data ingest over
torchvision's ImageFolder + DataLoader, measured side by side in one process.

Input: 3,000 ImageNet-like JPEGs (400 with --quick; 500x330..375, a fifth portrait 375x500, quality 90,
photo-like content of ~85 KB each, from bench.bench_prepare) in ImageNet's `folders` layout
(`train/<wnid>/*.JPEG`, `val/<wnid>/`).
Both pipelines produce the same thing: RandomResizedCrop(224, scale=(0.08, 1)) + horizontal flip, uint8
(N, 3, 224, 224) batches of 64 (normalisation happens later, on the training device, in both designs).

(a) ours: `prepare_shards` with the ImageNet preset's max_side (configs/imagenet-resnet50.yaml), then
    `train_dataset(files, ...)` iterated with `iter_torch_batches` as the training loop does (uint8, 2 batches
    of prefetch, a local shuffle buffer of 4 batches). Ray gets N logical CPUs (ray.init(num_cpus=N)).
(b) baseline: `ImageFolder(train/, RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor)` in a
    `DataLoader(num_workers=N, batch_size=64, shuffle=True, persistent_workers=True)` over the raw JPEGs.

N = 2 (the machine's cores). Each pipeline is warmed up with one untimed pass (worker processes forked,
Ray started, modules imported), then timed over full passes, alternating which goes first. A pass is timed
from creating the iterator to its last batch, so Ray Data's per-epoch start-up (planning, launching read
tasks) counts against us, as it does in training; time to the first batch is recorded separately.

The fair-comparison question: shards re-encode images whose longer side exceeds max_side (like FFCV's
max_resolution). At the preset's 512, no input here is re-encoded (ImageNet's median image is ~500x375,
like ours), so (a) and (b) decode identical JPEG bytes and the ratio measures the pipelines alone. The full
run adds `ingest_shards256_vs_imagefolder`: shards at max_side=256 (smaller JPEGs, ~4x fewer pixels to
decode: FFCV's max_resolution lever, as in its 256-px ImageNet files), against the same baseline in the same
alternation.

A pass is 3,000 images (the full run): Ray Data pays a per-epoch start-up (planning, launching the first tasks,
~1-1.5 s to the first batch here, recorded as first_batch_s) that a real epoch (1.28 M images) amortises and a
600-image pass does not; 1,500-image passes measured 1.25x where 3,000 measured 1.29x (same code, same hour).

    python -m bench.bench_ingest [--quick]     # prints the records as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load1, median_spread, paired_ratios, record

# Real ImageNet wnids (tench, English springer, cassette player, chain saw, church): the folders layout wants
# n######## names. The images are not those classes' photos, only photo-sized stand-ins.
WNIDS = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079")
TRAIN_PER_CLASS = 600  # 3,000 train images
VAL_PER_CLASS = 2
QUICK_TRAIN_PER_CLASS = 80  # 400
BATCH = 64
PROCS = 2
N_RUNS = 5
QUICK_N_RUNS = 3
# Shards of 250 rows: 6 train shards, an even 3 rounds for 2 concurrent tasks. A read+decode task costs Ray
# ~0.1 s of scheduling (seen in Ray Data's operator metrics here), so tiny shards of 64 rows measured mostly
# that (~300 img/s at 64 rows vs ~440 at 200 rows, same images, same run); the ImageNet preset writes 1,024.
ROWS_PER_SHARD = 250
PRESET = Path(__file__).resolve().parents[1] / "configs" / "imagenet-resnet50.yaml"
SMALL_MAX_SIDE = 256


def preset_settings() -> dict[str, Any]:
    """max_side, crop and min_scale of the ImageNet preset (what our product would use for 224 training)."""
    from pipeline.config import load_params

    p = load_params(PRESET)
    return {
        "max_side": p.data.max_side,
        "jpeg_quality": p.data.jpeg_quality,
        "crop": p.train.train_crop_size,
        "min_scale": p.train.train_crop_min_scale,
    }


def _write_images(args: tuple[str, list[tuple[str, int, int, int]]]) -> None:
    from bench.bench_prepare import _photo_like

    root, jobs = args
    for rel, width, height, seed in jobs:
        path = Path(root, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo_like(np.random.default_rng(seed), width, height).save(path, format="JPEG", quality=90)


def make_imagenet_tree(
    root: Path, train_per_class: int, val_per_class: int = VAL_PER_CLASS, seed: int = 0, processes: int = PROCS
) -> int:
    """ImageNet `folders` layout of photo-like JPEGs; returns the number of train images. Generation takes ~25 ms
    an image, so it is spread over `processes` processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    rng = np.random.default_rng(seed)
    jobs: list[tuple[str, int, int, int]] = []
    for wnid in WNIDS:
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            for i in range(count):
                # ImageNet's typical landscape 500x375, with a portrait image now and then.
                w, h = (375, 500) if rng.uniform() < 0.2 else (500, int(rng.integers(330, 376)))
                jobs.append((f"{split}/{wnid}/{wnid}_{split}_{i:04d}.JPEG", w, h, int(rng.integers(2**31))))
    parts = [(str(root), jobs[i::processes]) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=get_context("forkserver")) as pool:
        list(pool.map(_write_images, parts))
    return train_per_class * len(WNIDS)


# ------------------------------------------------------------------------------------------------ passes


def _timed_pass(
    batches: Iterable[dict[str, Any]] | Iterable[tuple[Any, Any]], crop: int
) -> tuple[int, float, float]:
    """(images, seconds for the whole pass, seconds to the first batch), consuming an iterable of batches."""
    n, first = 0, None
    t0 = time.perf_counter()
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        if images.dtype.is_floating_point or tuple(images.shape[1:]) != (3, crop, crop):
            raise AssertionError(f"unexpected batch {images.dtype} {tuple(images.shape)}")
        n += images.shape[0]
        if first is None:
            first = time.perf_counter() - t0
    return n, time.perf_counter() - t0, first or 0.0


def imagefolder_loader(train_dir: Path, crop: int, min_scale: float) -> Any:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T  # noqa: N812 (torchvision's own convention)

    tf = T.Compose(
        [T.RandomResizedCrop(crop, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()]
    )
    ds = datasets.ImageFolder(str(train_dir), transform=tf)
    return torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=PROCS, persistent_workers=True, prefetch_factor=2
    )


def ray_pass_fn(files: list[str], crop: int, min_scale: float) -> Callable[[], tuple[int, float, float]]:
    """A full pass of `train_dataset` as the library builds it and the training loop iterates it."""
    from pipeline.data import ingest

    return _loop_pass(ingest.train_dataset(files, crop=crop, min_scale=min_scale, seed=0), crop)


def _loop_pass(ds: Any, crop: int) -> Callable[[], tuple[int, float, float]]:
    """One timed pass over `ds`, iterated with the training loop's arguments (pipeline/training/loop.py), minus
    device=: CPU here."""
    import torch

    def one_pass() -> tuple[int, float, float]:
        batches = ds.iter_torch_batches(
            batch_size=BATCH, dtypes={"image": torch.uint8, "label": torch.int64},
            local_shuffle_buffer_size=4 * BATCH, prefetch_batches=2,
        )
        return _timed_pass(batches, crop)

    return one_pass


def worker_pass_fn(files: list[str], crop: int, min_scale: float) -> Callable[[], tuple[int, float, float]]:
    """train.decode "worker" on a CPU: Ray Data ships JPEG bytes + drawn boxes, this process decodes them (the
    training worker's role) in PROCS threads, each batch ahead of the consumer, as the training loop iterates."""
    from pipeline.data import ingest
    from pipeline.data.worker_decode import worker_batches

    ds = ingest.train_dataset(files, crop=crop, min_scale=min_scale, seed=0, decode="worker")

    def one_pass() -> tuple[int, float, float]:
        batches = worker_batches(ds, batch_size=BATCH, device="cpu", crop=crop, threads=PROCS,
                                 local_shuffle_buffer_size=4 * BATCH, prefetch_batches=2, drop_last=False)
        return _timed_pass(batches, crop)

    return one_pass


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


class _ZeroCrop:
    """A transform that decodes nothing: the output tensor of a real crop, zeros."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def __call__(self, _data: bytes) -> Any:
        import torch

        return torch.zeros((3, self.crop, self.crop), dtype=torch.uint8)


def imagefolder_plumbing_loader(train_dir: Path, crop: int) -> Any:
    """The baseline with decoding taken out: the same files read, the same batches of zero crops collated."""
    import torch
    from torchvision import datasets

    ds = datasets.ImageFolder(str(train_dir), loader=_read_bytes, transform=_ZeroCrop(crop))
    return torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=PROCS, persistent_workers=True, prefetch_factor=2
    )


def ray_plumbing_pass_fn(files: list[str], crop: int) -> Callable[[], tuple[int, float, float]]:
    """Our ingest with decoding taken out: the same shards read and hashed, the same fused operator yielding
    zero crops in DECODE_BATCH slices, iterated as the loop iterates."""
    from ray.data import FileShuffleConfig

    from pipeline.data import ingest, transforms

    def zero_decode(batch: dict[str, np.ndarray]) -> Any:  # a closure: pickled by value for Ray's workers
        for part in transforms.batch_slices(batch, transforms.DECODE_BATCH):
            yield {"image": np.zeros((len(part["key"]), 3, crop, crop), np.uint8),
                   "label": part["label"].astype(np.int64)}

    ds = ingest._read(files, shuffle=FileShuffleConfig(seed=0, reseed_after_execution=True))
    ds = ds.map_batches(zero_decode, batch_format="numpy", batch_size=None, num_cpus=ingest.TASK_CPUS)
    ds.context.op_resource_reservation_enabled = False
    return _loop_pass(ds, crop)


def _mean_jpeg_kb(files: list[str]) -> float:
    import pyarrow.parquet as pq

    sizes = [len(b) for f in files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    return statistics.mean(sizes) / 1e3


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    import ray
    from ray.data import DataContext

    from pipeline.data.prepare import prepare_shards
    from pipeline.data.shards import shard_files

    tmpdir = Path(tmpdir)
    cfg = preset_settings()
    crop, min_scale = cfg["crop"], cfg["min_scale"]
    raw = tmpdir / "raw"
    n_images = make_imagenet_tree(raw, QUICK_TRAIN_PER_CLASS if quick else TRAIN_PER_CLASS)
    shard_sets = {"shards": cfg["max_side"]} if quick else {"shards": cfg["max_side"], "shards256": SMALL_MAX_SIDE}
    files: dict[str, list[str]] = {}
    reencoded: dict[str, int] = {}
    for key, max_side in shard_sets.items():
        manifest = prepare_shards(
            raw, tmpdir / key, source="folders", max_side=max_side, jpeg_quality=cfg["jpeg_quality"],
            rows_per_shard=ROWS_PER_SHARD, workers=PROCS, max_rejected=0, progress=False,
        )
        files[key] = shard_files(tmpdir / key, "train", verify=True)
        reencoded[key] = int(manifest["splits"]["train"]["n_reencoded"])

    load_before = load1()
    # The DataLoader's workers are forked before Ray starts its threads (forking a threaded process is unsafe).
    loader = imagefolder_loader(raw / "train", crop, min_scale)
    plumbing_loader = imagefolder_plumbing_loader(raw / "train", crop)
    passes: dict[str, Callable[[], tuple[int, float, float]]] = {
        "imagefolder": lambda: _timed_pass(loader, crop),
        "imagefolder_plumbing": lambda: _timed_pass(plumbing_loader, crop),
    }
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=PROCS, include_dashboard=False, log_to_driver=False)
    try:
        for key in shard_sets:
            passes[key] = ray_pass_fn(files[key], crop, min_scale)
        passes["worker"] = worker_pass_fn(files["shards"], crop, min_scale)
        passes["plumbing"] = ray_plumbing_pass_fn(files["shards"], crop)
        # After building the datasets (the library sets it too): bench output stays readable; the bars' cost
        # is negligible either way.
        DataContext.get_current().enable_progress_bars = False
        for name, fn in passes.items():  # warm-up: worker start-up, imports, Ray's first execution
            n, _, _ = fn()
            if n != n_images:
                raise AssertionError(f"{name}: a pass gave {n} images, expected {n_images}")
        rate: dict[str, list[float]] = {k: [] for k in passes}
        first: dict[str, list[float]] = {k: [] for k in passes}
        n_runs = QUICK_N_RUNS if quick else N_RUNS
        order = list(passes)
        for rep in range(n_runs):
            for name in order if rep % 2 == 0 else order[::-1]:
                n, seconds, to_first = passes[name]()
                rate[name].append(n / seconds)
                first[name].append(to_first)
    finally:
        passes.clear()
        loader = plumbing_loader = None  # the last references: their persistent workers exit
        if started_ray:
            ray.shutdown()

    base, base_spread = median_spread(rate["imagefolder"])
    from pipeline.data import jpeg
    jpeg_roi = jpeg.available()
    from pipeline.data.ingest import TASK_CPUS
    raw_kb = statistics.mean(p.stat().st_size for p in (raw / "train").rglob("*.JPEG")) / 1e3
    records = []
    for key, max_side in shard_sets.items():
        value, value_spread = median_spread(rate[key])
        ratios = paired_ratios(rate[key], rate["imagefolder"])
        extra: dict[str, Any] = {
            "max_side": max_side,
            "images_per_pass": n_images,
            "output": f"uint8 ({BATCH}, 3, {crop}, {crop}): RandomResizedCrop({crop}, scale=({min_scale}, 1)) + hflip",
            "processes": f"DataLoader num_workers={PROCS}; ray.init(num_cpus={PROCS}), {TASK_CPUS:g} CPU per fused "
                         "read+decode task",
            "train_decoder": ("ROI decode (pipeline.data.jpeg)" if jpeg_roi else
                              "whole-image decode (ROI decoder not built)"),
            "value_spread": [round(v, 1) for v in value_spread],
            "baseline_spread": [round(v, 1) for v in base_spread],
            # Time to the first batch; ours includes filling the local shuffle buffer the loop asks for.
            "first_batch_s": {
                "ours": round(statistics.median(first[key]), 3),
                "baseline": round(statistics.median(first["imagefolder"]), 3),
            },
            "mean_jpeg_kb": {"raw": round(raw_kb, 1), "shards": round(_mean_jpeg_kb(files[key]), 1)},
            "note": (
                f"{reencoded[key]} of {n_images} train images re-encoded by prepare (max_side={max_side}); "
                f"{len(files[key])} shards of {ROWS_PER_SHARD} rows; full passes timed from iterator creation"
            ),
        }
        name = "ingest_vs_imagefolder" if key == "shards" else f"ingest_shards{max_side}_vs_imagefolder"
        records.append(
            record(
                name, value, "img/s", "torchvision_imagefolder_dataloader", base, n_runs,
                [min(ratios), max(ratios)], load_before=load_before, **extra,
            )
        )
    value, value_spread = median_spread(rate["worker"])
    ratios = paired_ratios(rate["worker"], rate["imagefolder"])
    records.append(record(
        "ingest_worker_decode_cpu_vs_imagefolder", value, "img/s", "torchvision_imagefolder_dataloader", base,
        n_runs, [min(ratios), max(ratios)], load_before=load_before,
        max_side=cfg["max_side"], images_per_pass=n_images,
        output=f"uint8 ({BATCH}, 3, {crop}, {crop}): RandomResizedCrop({crop}, scale=({min_scale}, 1)) + hflip",
        processes=f"DataLoader num_workers={PROCS}; ray.init(num_cpus={PROCS}) read+draw tasks, decode in this "
                  f"process in {PROCS} threads (train.decode: worker, on a CPU)",
        train_decoder=("ROI decode (pipeline.data.jpeg)" if jpeg_roi else "whole-image decode (ROI decoder not built)"),
        value_spread=[round(v, 1) for v in value_spread], baseline_spread=[round(v, 1) for v in base_spread],
        first_batch_s={"ours": round(statistics.median(first["worker"]), 3),
                       "baseline": round(statistics.median(first["imagefolder"]), 3)},
        note="the same shards as ingest_vs_imagefolder; the decode-on-worker path's CPU fallback (a GPU worker "
             "decodes with nvJPEG instead: make gpu-check)",
    ))
    value, value_spread = median_spread(rate["plumbing"])
    base_p, base_p_spread = median_spread(rate["imagefolder_plumbing"])
    ratios = paired_ratios(rate["plumbing"], rate["imagefolder_plumbing"])
    records.append(record(
        "ingest_plumbing_vs_imagefolder_plumbing", value, "img/s", "torchvision_imagefolder_dataloader_plumbing",
        base_p, n_runs, [min(ratios), max(ratios)], load_before=load_before,
        value_spread=[round(v, 1) for v in value_spread], baseline_spread=[round(v, 1) for v in base_p_spread],
        # CPU-ms an image the pipelines cost besides the transform: PROCS cores over the rate.
        ms_per_image_on_procs={"ours": round(PROCS * 1e3 / value, 3), "baseline": round(PROCS * 1e3 / base_p, 3)},
        note="both pipelines with decoding taken out (same files read, ours hashed and parsed, zero uint8 crops of "
             "the real shape batched as in the real passes): what each costs per image besides the transform",
    ))
    return records


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_ingest-") as tmp:
        out = run(Path(tmp), quick="--quick" in sys.argv[1:])
    json.dump(out, sys.stdout, indent=2)
    print()
