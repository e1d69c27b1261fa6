"""restart_prepare: what `data.restart_markers` costs prepare: images/s with 1 and 2 processes, the transcode on
(`mcu`) against off (`none`), and the bytes of the train shards before/after.

Input: bench.bench_prepare's raw tree (10 classes x 100 train + 20 val photo-like JPEGs, ~500x375, q90, ~85 KB)
prepared at max_side=512, so every image keeps its bytes (ImageNet's case at equal JPEG bytes) and the only
per-image work the flag adds is the lossless transcode. R repetitions, the four configurations alternating, each
into a fresh folder; wall time of prepare_shards; median [min, max] over repetitions.

    python -m bench.restart_prepare [--reps 3]   # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run(reps: int) -> dict[str, Any]:
    from bench.bench_prepare import make_raw_tree
    from bench.common import load1, machine
    from pipeline.data.prepare import prepare_shards

    load_before = load1()
    with tempfile.TemporaryDirectory(prefix="restart_prepare-") as tmp:
        raw = Path(tmp) / "raw"
        n_images = make_raw_tree(raw)
        configs = [(m, w) for w in (1, 2) for m in ("none", "mcu")]
        rates: dict[str, list[float]] = {f"{m}_{w}proc": [] for m, w in configs}
        train_bytes: dict[str, int] = {}
        for rep in range(reps):
            for mode, workers in configs if rep % 2 == 0 else configs[::-1]:
                out = Path(tmp) / f"out-{mode}-{workers}-{rep}"
                t0 = time.perf_counter()
                manifest = prepare_shards(raw, out, max_side=512, rows_per_shard=50, workers=workers,
                                          progress=False, restart_markers=mode, minival_per_class=0)
                rates[f"{mode}_{workers}proc"].append(n_images / (time.perf_counter() - t0))
                train_bytes[mode] = sum(s["nbytes"] for s in manifest["splits"]["train"]["shards"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "name": "restart_prepare", "machine": machine(load_before), "images": n_images, "repetitions": reps,
        "img_per_s": {k: {"median": round(med[k], 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                      for k, v in rates.items()},
        "mcu_over_none": {w: round(med[f"mcu_{w}"] / med[f"none_{w}"], 3) for w in ("1proc", "2proc")},
        "train_shard_bytes": train_bytes,
        "train_bytes_change_pct": round(100 * (train_bytes["mcu"] / train_bytes["none"] - 1), 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    json.dump(run(args.reps), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
