"""jpeg_decode_stages: where one train image's time goes, on one core, and the ratio over ImageFolder's
per-image work that the JPEG decoder's floor allows.

Input: the same ImageNet-like JPEGs as bench_ingest (500x330..375, a fifth portrait, quality 90, ~85 KB), 200 of
them; every variant decodes all of them in one pass, single-threaded (torch.set_num_threads(1)), 5 repetitions
alternating the order of the variants; a variant's figure is the median over repetitions of its mean ms an image,
in CPU time of the benchmark's thread (time.thread_time: the work itself, not the waits for a core that other
people's jobs on a shared machine cause; with SMT, a busy sibling still slows it somewhat).

Variants (the first four are one whole-image libjpeg-turbo decode stopped after a stage, pipeline.data.jpeg
`decode_stage`; each stage's cost is its time minus the previous one's):
- entropy: Huffman decoding into DCT coefficients, nothing else;
- idct: + inverse DCT (component planes, no upsampling);
- upsample: + fancy chroma upsampling (YCbCr out, no colour conversion);
- rgb: + YCbCr -> RGB (a full decode);
- roi_decode: our region decode of each image's RandomResizedCrop box (drawn as train_image draws it);
- resize: torchvision's antialiased uint8 resize of that region to 224 + flip (the rest of our transform);
- ours: `train_image` end to end (header, draws, ROI decode, resize, flip) -> uint8 (3, 224, 224);
- full_decode_path: today's fallback without the ROI decoder (torchvision decode_jpeg + resized_crop);
- imagefolder: the baseline's per-image work, PIL open + convert("RGB") + torchvision's PIL RandomResizedCrop
  + RandomHorizontalFlip + PILToTensor (what each ImageFolder worker does per image).

The floor: rows above a box must still be entropy-decoded (Huffman codes have no random access; a JPEG without
restart markers cannot be entered mid-scan), rows below it are not decoded at all. So the least a region decode can
cost is entropy x (the box's bottom edge / height) + (IDCT + upsampling + colour) x (the region's share of the
pixels); with the resize, that is the least per image our transform can cost on this decoder, and baseline / floor
is the best per-image ratio over ImageFolder it allows (before any pipeline overhead).

    python -m bench.bench_jpeg     # prints the record as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import load1, median_spread, paired_ratios, record

N_IMAGES = 200
QUICK_N_IMAGES = 60
N_RUNS = 5
QUICK_N_RUNS = 3
CROP = 224
MIN_SCALE = 0.08


def _images(tmpdir: Path, n: int) -> list[bytes]:
    from bench.bench_ingest import WNIDS, make_imagenet_tree

    make_imagenet_tree(tmpdir, train_per_class=-(-n // len(WNIDS)), val_per_class=0)
    return [p.read_bytes() for p in sorted((tmpdir / "train").rglob("*.JPEG"))][:n]


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    import torch
    from PIL import Image
    from torchvision import transforms as T  # noqa: N812 (torchvision's convention)

    from pipeline.data import jpeg
    from pipeline.data import transforms as tf

    if not jpeg.available():
        raise RuntimeError("jpeg_decode_stages needs the ROI decoder: run `make setup` (gcc + libjpeg-turbo headers)")
    torch.set_num_threads(1)
    images = _images(Path(tmpdir), QUICK_N_IMAGES if quick else N_IMAGES)
    heads = [jpeg.header(d) for d in images]
    draws = [tf.draw_train_crop(w, h, np.random.default_rng(i), MIN_SCALE, True) for i, (w, h, _, _) in
             enumerate(heads)]
    plans = [tf.crop_window_box(w, h, box, CROP) for (w, h, _, _), (box, _) in zip(heads, draws, strict=True)]
    windows = []
    for d, (denom, (x, y, rw, rh), inner) in zip(images, plans, strict=True):
        win, x0 = jpeg.decode_region(d, x, y, rw, rh, denom)
        windows.append((torch.from_numpy(win).permute(2, 0, 1), (inner[0], inner[1] + x - x0, inner[2], inner[3])))
    baseline_tf = T.Compose([T.RandomResizedCrop(CROP, scale=(MIN_SCALE, 1.0)), T.RandomHorizontalFlip(),
                             T.PILToTensor()])

    def stage(k: int) -> Callable[[int, bytes], Any]:
        return lambda i, d: jpeg.decode_stage(d, k, heads[i][0])

    def roi(i: int, d: bytes) -> Any:
        _, (x, y, rw, rh), _ = plans[i]
        return jpeg.decode_region(d, x, y, rw, rh, plans[i][0])

    def resize(i: int, d: bytes) -> Any:
        return tf.resized_crop_window(windows[i][0], windows[i][1], CROP, draws[i][1])

    # One generator per pass, as TrainDecode makes one per 64-row slice (building one costs ~0.1 ms, more than
    # an image's draws); the baseline draws from torch's global generator.
    rngs = {"ours": np.random.default_rng(0), "full_decode_path": np.random.default_rng(0)}

    def ours(i: int, d: bytes) -> Any:
        return tf.train_image(d, CROP, rngs["ours"], MIN_SCALE)

    def full_path(i: int, d: bytes) -> Any:
        return tf._train_image_tensor(d, heads[i][0], heads[i][1], CROP, rngs["full_decode_path"], MIN_SCALE, True)

    def imagefolder(i: int, d: bytes) -> Any:
        import io

        return baseline_tf(Image.open(io.BytesIO(d)).convert("RGB"))

    variants: dict[str, Callable[[int, bytes], Any]] = {
        "entropy": stage(0), "idct": stage(1), "upsample": stage(2), "rgb": stage(3), "roi_decode": roi,
        "resize": resize, "ours": ours, "full_decode_path": full_path, "imagefolder": imagefolder,
    }
    load_before = load1()
    ms: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for fn in variants.values():  # warm-up: imports, first-call allocations
        for i, d in enumerate(images[:10]):
            fn(i, d)
    n_runs = QUICK_N_RUNS if quick else N_RUNS
    for rep in range(n_runs):
        for name in order if rep % 2 == 0 else order[::-1]:
            fn = variants[name]
            if name in rngs:
                rngs[name] = np.random.default_rng(rep)
            t0 = time.thread_time()
            for i, d in enumerate(images):
                fn(i, d)
            ms[name].append((time.thread_time() - t0) * 1e3 / len(images))
    med = {k: statistics.median(v) for k, v in ms.items()}
    stages = {
        "entropy decoding": med["entropy"],
        "inverse DCT": med["idct"] - med["entropy"],
        "chroma upsampling": med["upsample"] - med["idct"],
        "colour conversion": med["rgb"] - med["upsample"],
    }
    # The region each box needs, as shares of the image: rows down to the box's bottom (entropy-decoded), and
    # the decoded region's pixels (IDCT + upsampling + colour), at the region's DCT scale.
    bottom_share, pixel_share = [], []
    for (w, h, _, _), (denom, (_x, y, rw, rh), _) in zip(heads, plans, strict=True):
        sw, sh = jpeg.scaled_size(w, h, denom)
        bottom_share.append((y + rh) / sh)
        pixel_share.append(rw * rh / (sw * sh) / denom**2)
    post_entropy = med["rgb"] - med["entropy"]
    floor_decode = med["entropy"] * statistics.mean(bottom_share) + post_entropy * statistics.mean(pixel_share)
    floor_total = floor_decode + med["resize"]
    ours_rate = [1e3 / v for v in ms["ours"]]
    base_rate = [1e3 / v for v in ms["imagefolder"]]
    value, _ = median_spread(ours_rate)
    base, _ = median_spread(base_rate)
    ratios = paired_ratios(ours_rate, base_rate)
    r2 = {k: round(v, 3) for k, v in med.items()}
    return [record(
        "jpeg_decode_stages", value, "img/s per core", "imagefolder_pil_transform_per_core", base, n_runs,
        [min(ratios), max(ratios)], load_before=load_before,
        images=len(images), mean_jpeg_kb=round(statistics.mean(len(d) for d in images) / 1e3, 1),
        ms_per_image=r2,
        stage_ms={k: round(v, 3) for k, v in stages.items()},
        box_shares={"rows_to_box_bottom": round(statistics.mean(bottom_share), 3),
                    "region_pixels": round(statistics.mean(pixel_share), 3)},
        floor_ms={"region_decode": round(floor_decode, 3), "with_resize": round(floor_total, 3)},
        best_ratio_floor_allows=round(med["imagefolder"] / floor_total, 3),
        ratio_without_resize_cost=round(med["imagefolder"] / floor_decode, 3),
        full_decode_path_ratio=round(med["imagefolder"] / med["full_decode_path"], 3),
        note=("one core, per-image work only (no Ray, no DataLoader); stage costs are differences of cumulative "
              "whole-image decodes; the floor assumes rows above a box cost their entropy decoding and the region's "
              "pixels their IDCT + upsampling + colour conversion, nothing else"),
    )]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench_jpeg-") as tmp:
        out = run(Path(tmp), quick="--quick" in sys.argv[1:])
    json.dump(out, sys.stdout, indent=2)
    print()
