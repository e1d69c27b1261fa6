"""prepare_scaling_2proc: prepare throughput with 2 worker processes over 1, measured side by side.

Real photos are not available offline, so the input is ~600 JPEGs of about ImageNet's median size (500x375,
some portrait), quality 90, whose content (smooth colour fields + multi-scale texture + noise) compresses
like a photo's (~85 KB each). max_side=256 forces every image through decode -> resize -> re-encode,
the expensive path a real prepare with max_side takes. Each repetition prepares into a fresh folder, the
worker counts alternate between repetitions to cancel drift on a shared machine, and the reported values
are medians over n_runs with the spread of the per-repetition ratios.

    python -m bench.bench_prepare            # prints the records as JSON
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import paired_ratios, record

N_CLASSES = 10
TRAIN_PER_CLASS = 100
VAL_PER_CLASS = 20
N_RUNS = 5
MAX_SIDE = 256
# 24 shards of 50: enough tasks that 2 processes stay busy to the end. 1,200 images take ~5 s at 1 process:
# long enough that starting the worker pool (~0.5 s) does not decide the ratio, as it would not on ImageNet.
ROWS_PER_SHARD = 50


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour regions + mid/fine texture + sensor-like noise (a photo's JPEG statistics)."""
    pixels = np.full((height, width, 3), 128.0, np.float32) + rng.uniform(-40, 40, 3)
    for cells, amplitude in ((3, 60.0), (12, 30.0), (48, 24.0), (160, 22.0)):
        coarse = np.clip(128 + rng.normal(0, amplitude, (cells, cells, 3)), 0, 255).astype(np.uint8)
        up = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
        pixels += np.asarray(up, np.float32) - 128
    pixels += rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_raw_tree(root: Path, seed: int = 0) -> int:
    """An imagefolder tree (train/<class>/, val/<class>/) of photo-like JPEGs; returns the image count."""
    rng = np.random.default_rng(seed)
    n = 0
    for c in range(N_CLASSES):
        for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # ImageNet's typical landscape 500x375, with a portrait image now and then.
                size = (375, 500) if rng.uniform() < 0.2 else (500, int(rng.integers(330, 376)))
                _photo_like(rng, *size).save(folder / f"img{i:04d}.jpg", quality=90)
                n += 1
    return n


def run(tmpdir: Path) -> list[dict[str, Any]]:
    from pipeline.data.prepare import prepare_shards

    tmpdir = Path(tmpdir)
    raw = tmpdir / "raw"
    n_images = make_raw_tree(raw)
    load_before = os.getloadavg()[0]
    rates: dict[int, list[float]] = {1: [], 2: []}
    manifests: dict[int, dict[str, Any]] = {}
    for rep in range(N_RUNS):
        for workers in (1, 2) if rep % 2 == 0 else (2, 1):
            out = tmpdir / f"shards-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifests[workers] = prepare_shards(
                raw,
                out,
                max_side=MAX_SIDE,
                rows_per_shard=ROWS_PER_SHARD,
                workers=workers,
                max_rejected=0,
                progress=False,
            )
            rates[workers].append(n_images / (time.perf_counter() - start))
    if manifests[1] != manifests[2]:
        raise AssertionError("prepare output differs between 1 and 2 workers")
    ratios = paired_ratios(rates[2], rates[1])
    value, baseline = statistics.median(rates[2]), statistics.median(rates[1])
    return [
        record(
            "prepare_scaling_2proc",
            value,
            "img/s",
            "prepare_1proc",
            baseline,
            N_RUNS,
            [min(ratios), max(ratios)],  # of the per-repetition ratios
            load_before=load_before,
        )
    ]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        records = run(Path(tmp))
    json.dump(records, sys.stdout, indent=2)
    print()
