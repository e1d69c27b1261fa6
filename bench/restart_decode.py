"""restart_decode: region decoding by stream surgery on JPEGs transcoded with restart markers, against today's
region-of-interest decode and a full decode (pipeline.data.jpeg: add_restart_markers, decode_region_restart).

Input: N photo-like JPEGs of 500x375 4:2:0, quality 90 (bench.bench_prepare._photo_like, the generator the other
benches use), each transcoded losslessly three ways: one restart interval per MCU row, per MCU, per 4 MCUs. Per
image, B RandomResizedCrop boxes (scale 0.08-1, ratio 3/4-4/3) planned as train_image plans them for a 224 px
crop (tf.crop_window_box: the box widened 1 px, DCT-scaled when at least twice the crop). One core, CPU time of
the thread (time.thread_time); R repetitions, the variants' order alternating. Per image and variant: the mean ms
over its boxes in each repetition -> median and [min, max] over repetitions. Variants:

- roi: today's decode_region on the original file (rows above the box Huffman-decoded, then skipped);
- roi_transcoded: the same decode on the row-interval transcode (what optimised tables + markers alone change);
- surgery: decode_region_restart on the row-interval transcode (only the box's MCU rows, full width);
- surgery_mcu / surgery_4mcu: the same on the per-MCU / per-4-MCU transcodes (only the box's MCUs);
- full: a whole-image decode to RGB of the original (decode_stage 3);
- scan: restart_index of the row-interval transcode alone (surgery runs this scan inside every decode);
- transcode: add_restart_markers with one interval per MCU row (prepare's cost a train image).

Sizes: each transcode's bytes over the original's in %, and an optimising transcode without markers (what the
markers themselves cost is the difference). entropy_decoded_share: the mean share of the image's MCUs each
variant Huffman-decodes (roi: the rows down to the box's bottom; surgery: its sub-image's area).

    python -m bench.restart_decode [--n 60] [--boxes 20] [--reps 5]   # prints one JSON object
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def _summary(xs: list[float], nd: int = 3) -> dict[str, float]:
    return {"median": round(statistics.median(xs), nd), "p10": round(_pct(xs, 10), nd),
            "p90": round(_pct(xs, 90), nd), "min": round(min(xs), nd), "max": round(max(xs), nd)}


def run(n: int, n_boxes: int, reps: int, seed: int = 0) -> dict[str, Any]:
    from bench.bench_prepare import _photo_like
    from bench.common import load1, machine
    from pipeline.data import jpeg
    from pipeline.data import transforms as tf

    if not jpeg.available():
        raise RuntimeError("restart_decode needs the native decoder: run `make setup`")
    load_before = load1()
    rng = np.random.default_rng(seed)
    originals = []
    for _ in range(n):
        buf = io.BytesIO()
        _photo_like(rng, 500, 375).save(buf, format="JPEG", quality=90)
        originals.append(buf.getvalue())
    transcoded = [jpeg.add_restart_markers(d) for d in originals]
    per_mcu = [jpeg.add_restart_markers(d, restart_mcus=1) for d in originals]
    per_4mcu = [jpeg.add_restart_markers(d, restart_mcus=4) for d in originals]  # 500 px: 32 MCUs a row
    sizes = {
        "rows1": [len(t) / len(d) - 1 for t, d in zip(transcoded, originals, strict=True)],
        "no_markers": [len(jpeg.add_restart_markers(d, restart_rows=0)) / len(d) - 1 for d in originals],
        "per_mcu": [len(t) / len(d) - 1 for t, d in zip(per_mcu, originals, strict=True)],
        "per_4mcu": [len(t) / len(d) - 1 for t, d in zip(per_4mcu, originals, strict=True)],
    }
    plans = []
    shares: dict[str, list[float]] = {"roi": [], "surgery": [], "surgery_mcu": [], "surgery_4mcu": []}
    for i in range(n):
        for name, files in (("rows", transcoded), ("mcu", per_mcu), ("4mcu", per_4mcu)):
            ix = jpeg.restart_index(files[i])
            if not (ix.column_addressable if name != "rows" else ix.row_addressable):
                raise AssertionError(f"image {i}: the {name} transcode is not addressable as expected")
        boxes = []
        for _ in range(n_boxes):
            box = tf.random_resized_crop_box(500, 375, rng, (0.08, 1.0), (3 / 4, 4 / 3))
            denom, region, _ = tf.crop_window_box(500, 375, box, 224)
            boxes.append((denom, region))
            x, y, w, h = region
            sh = -(-375 // denom)
            shares["roi"].append((y + h) / sh)  # rows to the box's bottom, full width
            # The share of the image's MCUs each surgery entropy-decodes: its sub-image's area.
            for name, files in (("surgery", transcoded), ("surgery_mcu", per_mcu), ("surgery_4mcu", per_4mcu)):
                sub, _, _ = jpeg.restart_band(files[i], x, y, w, h, denom)
                sub_w, sub_h = jpeg.header(sub)[:2]
                shares[name].append(sub_w * sub_h / (500 * 375))
                # Same pixels: the surgery window equals the ROI window of the original over the region.
                a, ax = jpeg.decode_region_restart(files[i], x, y, w, h, denom)
                b, bx = jpeg.decode_region(originals[i], x, y, w, h, denom)
                if not np.array_equal(a[1 : h - 1, x - ax + 1 : x - ax + w - 1],
                                      b[1 : h - 1, x - bx + 1 : x - bx + w - 1]):
                    raise AssertionError(f"image {i}: {name} and ROI decodes differ for {region} at 1/{denom}")
        plans.append(boxes)

    def per_box(fn: Callable[[int, int, tuple[int, int, int, int]], Any]) -> Callable[[int], None]:
        def go(i: int) -> None:
            for denom, region in plans[i]:
                fn(i, denom, region)
        return go

    variants: dict[str, Callable[[int], Any]] = {
        "roi": per_box(lambda i, s, r: jpeg.decode_region(originals[i], *r, s)),
        "roi_transcoded": per_box(lambda i, s, r: jpeg.decode_region(transcoded[i], *r, s)),
        "surgery": per_box(lambda i, s, r: jpeg.decode_region_restart(transcoded[i], *r, s)),
        "surgery_mcu": per_box(lambda i, s, r: jpeg.decode_region_restart(per_mcu[i], *r, s)),
        "surgery_4mcu": per_box(lambda i, s, r: jpeg.decode_region_restart(per_4mcu[i], *r, s)),
        "full": lambda i: [jpeg.decode_stage(originals[i], 3, 500) for _ in range(n_boxes)],
        "scan": lambda i: [jpeg.restart_index(transcoded[i]) for _ in range(n_boxes)],
        "transcode": lambda i: jpeg.add_restart_markers(originals[i]),
    }
    calls = {k: (1 if k == "transcode" else n_boxes) for k in variants}
    for fn in variants.values():  # warm-up
        for i in range(min(3, n)):
            fn(i)
    ms: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in variants}
    order = list(variants)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            fn = variants[name]
            for i in range(n):
                t0 = time.thread_time()
                fn(i)
                ms[name][i].append((time.thread_time() - t0) * 1e3 / calls[name])
    med = {k: [statistics.median(v) for v in per] for k, per in ms.items()}
    spread = {k: [(max(v) - min(v)) / statistics.median(v) for v in per] for k, per in ms.items()}
    def ratio(a: str, b: str) -> dict[str, float]:
        return _summary([x / y for x, y in zip(med[a], med[b], strict=True)])

    return {
        "name": "restart_decode",
        "machine": machine(load_before),
        "images": n, "boxes_per_image": n_boxes, "repetitions": reps, "size": [500, 375], "quality": 90,
        "mean_jpeg_kb": round(statistics.mean(len(d) for d in originals) / 1e3, 1),
        "ms_per_image": {k: _summary(v) for k, v in med.items()},
        "relative_spread_over_reps": {k: round(statistics.median(v), 3) for k, v in spread.items()},
        "ratio_surgery_over_roi": ratio("surgery", "roi"),
        "ratio_surgery_mcu_over_roi": ratio("surgery_mcu", "roi"),
        "ratio_surgery_4mcu_over_roi": ratio("surgery_4mcu", "roi"),
        "ratio_roi_over_full": ratio("roi", "full"),
        "ratio_surgery_over_full": ratio("surgery", "full"),
        "ratio_surgery_mcu_over_full": ratio("surgery_mcu", "full"),
        "size_overhead_pct": {k: _summary([100 * x for x in v], 2) for k, v in sizes.items()},
        "entropy_decoded_share": {k: round(statistics.mean(v), 3) for k, v in shares.items()},
        "transcode_img_per_s_one_core": round(1e3 / statistics.median(med["transcode"]), 1),
        "note": ("ms_per_image: per image, the median over repetitions of its mean ms a box (transcode: a file), "
                 "then the summary over images; relative_spread_over_reps: (max - min) / median over "
                 "repetitions, the median over images; ratios are per image, of the medians"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60, help="images")
    ap.add_argument("--boxes", type=int, default=20, help="crop boxes an image")
    ap.add_argument("--reps", type=int, default=5, help="repetitions")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    json.dump(run(args.n, args.boxes, args.reps), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
