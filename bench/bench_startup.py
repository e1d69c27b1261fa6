"""Start-up cost before the first training step: a full sha256 re-hash of the train shards vs the cheap checks.

    .venv/bin/python -m bench.bench_startup [--gb 2] [--shards 32] [--dir /tmp/bench_startup] [--keep]

Generates two datasets of the same number of Parquet shards in the shard schema (random bytes in the image
column: start-up never decodes an image), one of `gb` GB and one of a quarter of it, each with a version-2
manifest (rows, nbytes, sha256 per shard), then measures, side by side in one process, alternating, `--runs`
times on each:

- before: a start-up that re-hashes: read the manifest and sha256 every train shard (one full read of the
  dataset before the first step);
- after: `shard_files(verify=True)`: the manifest, one listing for the sizes, each shard's Parquet
  footer (row count, schema). Bytes are hashed later, by the read task that fetches them anyway.

"after" must not grow with the dataset's bytes: the two sizes have the same shard count, so its time should be
the same for both, while "before" grows 4x. The page cache is warm for both (the files were just written), so
"before" is a lower bound: cold, it reads the dataset from disk or the network.

It also measures why no faster checksum is recorded next to sha256: hashing throughput (sha256, crc32) against
the JPEG decode that follows every read (pipeline.data.transforms.train_image on a 500x375 JPEG, ~110 KB, an
ImageNet-sized image): hash-while-reading adds hash_s / decode_s to a read task's work.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import time
import zlib
from pathlib import Path

import numpy as np


def _make_dataset(root: Path, n_shards: int, shard_bytes: int, seed: int) -> int:
    """`n_shards` train shards of ~`shard_bytes` each (+ 1 small val shard) and a v2 manifest; returns bytes."""
    from pipeline.data.shards import MANIFEST_VERSION, encode_shard

    rng = np.random.default_rng(seed)
    rows, image_bytes = 64, shard_bytes // 64
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    entries, total = [], 0
    for split, count in (("train", n_shards), ("val", 1)):
        for i in range(count):
            images = [rng.bytes(image_bytes) for _ in range(rows)]
            blob = encode_shard({"image": images, "label": [j % 10 for j in range(rows)],
                                   "wnid": [f"n{j % 10:08d}" for j in range(rows)],
                                   "key": [f"{split}/{i}/{j}" for j in range(rows)],
                                   "height": [375] * rows, "width": [500] * rows})
            path = f"{split}/{i:05d}.parquet"
            (root / path).write_bytes(blob)
            entries.append((split, {"path": path, "rows": rows, "nbytes": len(blob),
                                    "sha256": hashlib.sha256(blob).hexdigest()}))
            total += len(blob)
    classes = [{"index": k, "wnid": f"n{k:08d}", "name": f"class {k}"} for k in range(10)]
    splits = {s: {"n_images": rows * sum(1 for t, _ in entries if t == s), "n_reencoded": 0,
                  "class_counts": {}, "shards": [e for t, e in entries if t == s]} for s in ("train", "val")}
    manifest = {"version": MANIFEST_VERSION, "fingerprint": f"bench{seed}", "classes": classes, "num_classes": 10,
                "splits": splits, "source": {"layout": "bench", "raw_dir": "-", "fingerprint": "-"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return total


def _before(root: Path) -> float:
    """A re-hashing start-up: manifest + sha256 of every train shard."""
    from pipeline.data.shards import read_manifest, sha256_file

    t0 = time.perf_counter()
    manifest = read_manifest(root)
    for shard in manifest["splits"]["train"]["shards"]:
        if sha256_file(root / shard["path"]) != shard["sha256"]:
            raise SystemExit(f"{shard['path']}: checksum differs")
    return time.perf_counter() - t0


def _after(root: Path) -> float:
    from pipeline.data.shards import shard_files

    t0 = time.perf_counter()
    shard_files(root, "train", verify=True)
    return time.perf_counter() - t0


def _throughputs(seconds: float = 1.0) -> dict[str, float]:
    """MB/s of sha256 and crc32 over 64 MB, and of JPEG decoding (input MB/s of train_image, one core)."""
    from PIL import Image

    from pipeline.data.transforms import train_image

    buf = np.random.default_rng(0).bytes(64 << 20)
    out = {}
    for name, fn in (("sha256", lambda: hashlib.sha256(buf).digest()), ("crc32", lambda: zlib.crc32(buf))):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        out[f"{name}_MBps"] = n * len(buf) / 1e6 / (time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((500, 375), Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(img, np.float32) + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(noisy).save(jpeg, format="JPEG", quality=90)
    data = jpeg.getvalue()
    train_image(data, 224, rng, 0.08)  # warm-up: the first call imports and initialises the decoder
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train_image(data, 224, rng, 0.08)
        n += 1
    elapsed = time.perf_counter() - t0
    out["decode_MBps"] = n * len(data) / 1e6 / elapsed
    out["decode_img_per_s"] = n / elapsed
    out["jpeg_kb"] = len(data) / 1e3
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the large dataset (GB)")
    ap.add_argument("--shards", type=int, default=32, help="train shards in each dataset")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/bench_startup")
    ap.add_argument("--keep", action="store_true", help="keep the generated shards")
    args = ap.parse_args(argv)
    from bench.common import machine

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    sizes = {"large": args.gb * 1e9, "small": args.gb * 1e9 / 4}
    roots, nbytes = {}, {}
    try:
        for i, (name, size) in enumerate(sizes.items()):
            roots[name] = base / name
            nbytes[name] = _make_dataset(roots[name], args.shards, int(size / args.shards), seed=i)
        times: dict[str, dict[str, list[float]]] = {n: {"before": [], "after": []} for n in roots}
        for r in range(args.runs):
            for name, root in roots.items():
                order = (_before, _after) if r % 2 == 0 else (_after, _before)  # alternate: drift hits both
                for fn in order:
                    times[name][fn.__name__.strip("_")].append(fn(root))
        print(f"machine: {machine()}")
        print(f"{'dataset':<8} {'GB':>6} {'shards':>6} {'before (sha256 all) s':>22} {'after (sizes+footers) s':>24}")
        for name in roots:
            b, a = statistics.median(times[name]["before"]), statistics.median(times[name]["after"])
            print(f"{name:<8} {nbytes[name] / 1e9:>6.2f} {args.shards:>6} {b:>22.3f} {a:>24.4f}   "
                  f"(runs: before {[round(x, 3) for x in times[name]['before']]}, "
                  f"after {[round(x, 4) for x in times[name]['after']]})")
        tp = _throughputs()
        print(f"hash throughput, one core: sha256 {tp['sha256_MBps']:.0f} MB/s, crc32 {tp['crc32_MBps']:.0f} MB/s; "
              f"JPEG decode + crop ({tp['jpeg_kb']:.0f} KB, 500x375 -> 224): {tp['decode_img_per_s']:.0f} img/s = "
              f"{tp['decode_MBps']:.1f} MB/s of input")
        print(f"hash-while-reading with sha256 adds {100 * tp['decode_MBps'] / tp['sha256_MBps']:.1f}% to a read "
              f"task's decode work (crc32 would add {100 * tp['decode_MBps'] / tp['crc32_MBps']:.1f}%)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
