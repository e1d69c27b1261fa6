"""Raw images -> deterministic Parquet shards + manifest.json + rejected.csv (the `prepare` stage).

Output: `out_dir/{train,minival,val}/NNNNN.parquet`, one row per image with columns
`image` (JPEG bytes), `label`, `wnid`, `key`, `height`, `width`.

`minival` is carved from the raw train split (`minival_per_class` images of every class, drawn with
`minival_seed`): the held-out set that tune selects learning rates on, so the val set is only ever evaluated.
Its images are in no train shard; final training reads train + minival (the full train set) by default.
Separate shards, not a list of keys: every reader still opens whole files named in the manifest, with their
sizes and sha256, and the train shards a trial reads hold no minival row to filter out.

Guarantees, and how they are kept:
- Byte-identical output whatever `workers` is: the plan (which sample goes to which shard) is computed up
  front from the sorted listing and a fixed shuffle seed; each shard is then a pure function of its samples;
  Parquet is written with a fixed schema, codec, row group size and no timestamps.
- Anywhere pyarrow.fs reaches: `out_dir` is a local path or a URI (s3://, gs://, file://; see
  pipeline.runtime for endpoints and credentials, which only the environment gives).
- Atomic: each shard goes to `*.tmp` then `os.replace` (an object store shows an object only once its upload
  completes); the manifest is written last, so a manifest there means a complete set of shards.
- Resumable: `.plan.json` (written first) records the plan fingerprint, and `.done/<split>-NNNNN.json`
  records each finished shard's checksum; a rerun with the same plan keeps the shards that still match and
  writes only the others; a different plan of the same raw dataset starts over cleanly.
- Never destroys another dataset: a different plan in a folder whose complete manifest comes from another
  raw dataset stops with a message naming both, unless `replace=True` (`python -m stages.prepare --replace`).
- Nothing dropped silently: every input that cannot become an RGB JPEG is listed in rejected.csv with a
  reason, and more rejections than `max_rejected` fail the run (after rejected.csv is written).

`restart_markers` ("mcu" or "rows"; default "none"): each train image is then transcoded losslessly with restart
markers (pipeline.data.jpeg.add_restart_markers: the same DCT coefficients, so the same decoded pixels), which
lets the train transform decode only a crop's restart intervals (docs/performance.md). val and minival keep
their bytes: what is evaluated is what users evaluate on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from pipeline import runtime
from pipeline.data.shards import (
    MANIFEST,
    MANIFEST_VERSION,
    ROW_GROUP_ROWS,
    Manifest,
    encode_shard,
    shard_schema,
    write_manifest,
)
from pipeline.data.sources import DataError, Rejection, Sample, SourceListing, list_source
from pipeline.progress import Progress, print_line

REJECTED = "rejected.csv"
PLAN = ".plan.json"
DONE_DIR = ".done"
MINIVAL = "minival"
VAL = "val"
# Every split prepare writes, in plan order: the two raw splits and the minival split carved from train.
PREPARED_SPLITS: tuple[str, ...] = ("train", MINIVAL, VAL)


# data.max_pixels' default: 50 Mpx is 200 MB as RGBA, 150 MB as RGB, per decode.
DEFAULT_MAX_PIXELS = 50_000_000
RESTART_MARKERS = ("none", "rows", "mcu")


class RejectedImage(Exception):
    """An input that cannot become an RGB JPEG; the message is the reason written to rejected.csv."""


# ---------------------------------------------------------------------------------------- one image


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """PIL must decode every byte: a truncated file is a rejection, not a grey-padded image."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _to_rgb(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        # Composite transparent images on white (what a viewer shows) rather than on black.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/float greyscale: scale to 8 bits first; PIL's RGB conversion would clip it.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) or 1.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # CMYK (PIL undoes Adobe's inverted CMYK), L, P, YCbCr, ...


def normalize_image(data: bytes, *, max_side: int | None, jpeg_quality: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, int, int, bool]:
    """-> (JPEG bytes, height, width, re-encoded?). Raises RejectedImage with the reason.

    An image of more than `max_pixels` pixels (its header's width x height) is rejected before a byte of it is
    decoded: a decompression bomb costs the header read only.

    The original bytes are kept when they already are a fully decodable RGB JPEG (baseline or progressive)
    no larger than `max_side`; anything else is decoded, converted to RGB, shrunk so that its longer side is
    `max_side` and re-encoded at `jpeg_quality`. `max_side=None` never shrinks: an RGB JPEG of any size is kept
    byte for byte, anything else is converted to RGB at its own size (what the val split gets, see build_shard).
    """
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    with _strict_decoding(), warnings.catch_warnings():
        # The budget below decides; Pillow's DecompressionBombWarning band (89.5-179 Mpx) would only add noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise RejectedImage("not an image (PIL cannot identify the format)") from None
        except Image.DecompressionBombError as exc:
            raise RejectedImage(f"too large to decode safely: {exc}") from None
        except Exception as exc:  # a corrupt header can raise almost anything inside PIL's plugins
            raise RejectedImage(f"corrupt image header: {type(exc).__name__}: {exc}") from None
        with img:
            fmt, width, height = img.format, img.size[0], img.size[1]
            if width * height > max_pixels:
                raise RejectedImage(f"{fmt} of {width}x{height} = {width * height / 1e6:.1f} Mpx is over the pixel "
                                    f"budget data.max_pixels={max_pixels} (not decoded)")
            fits = max_side is None or max(width, height) <= max_side
            keep = fmt == "JPEG" and img.mode == "RGB" and fits
            if not fits and fmt == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still leaves >= the target size:
                # much faster for large photos, and the final resize below still anti-aliases.
                scale = max_side / max(width, height)
                img.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
            try:
                img.load()
            except Exception as exc:  # OSError "image file is truncated", SyntaxError, zlib errors, ...
                raise RejectedImage(f"truncated or corrupt {fmt} data: {type(exc).__name__}: {exc}") from None
            if keep:
                return data, height, width, False
            try:
                rgb = _to_rgb(img)
            except Exception as exc:
                raise RejectedImage(f"cannot convert mode {img.mode} to RGB: {exc}") from None
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue(), rgb.size[1], rgb.size[0], True


# --------------------------------------------------------------------------------------------- one shard


@dataclass(frozen=True)
class ShardTask:
    split: str
    index: int
    path: str  # relative to out_dir, e.g. "train/00000.parquet"
    samples: tuple[Sample, ...]
    labels: tuple[int, ...]


@dataclass
class ShardResult:
    split: str
    index: int
    path: str
    rows: int
    sha256: str
    nbytes: int
    class_counts: dict[str, int]
    reencoded: int
    rejected: list[list[str]] = field(default_factory=list)  # [key, split, reason]
    restart_transcoded: int = 0  # images written with restart markers (data.restart_markers)


def add_restarts(image: bytes, restart_markers: str) -> tuple[bytes, bool]:
    """A train image's JPEG bytes with restart markers ("mcu": one interval per MCU, "rows": per MCU row), added
    losslessly -> (bytes, transcoded?). A file libjpeg decodes only with a corrupt-data warning keeps its bytes
    (decoders then read it whole, as before), so no damage is baked into the copy."""
    from pipeline.data import jpeg

    spacing = {"restart_mcus": 1} if restart_markers == "mcu" else {"restart_rows": 1}
    try:
        return jpeg.add_restart_markers(image, **spacing), True
    except jpeg.JpegError:
        return image, False


def build_shard(task: ShardTask, out_dir: str, max_side: int, jpeg_quality: int,
                max_pixels: int = DEFAULT_MAX_PIXELS, restart_markers: str = "none") -> ShardResult:
    """Read, check and (if needed) re-encode the task's samples, then write its shard atomically.

    `max_side` applies to the train and minival splits only: the val split keeps its images as they are (their
    original bytes when they are RGB JPEGs), because val is what a reported error is measured on, and the
    published numbers resize the original photo (e.g. to 256) before the centre crop. A val photo shrunk to
    `max_side` first, then resized again, is a different image and gives a different error.
    """
    side = None if task.split == VAL else max_side
    columns: dict[str, list[Any]] = {name: [] for name in shard_schema().names}
    rejected: list[list[str]] = []
    reencoded = 0
    transcoded = 0
    restarts = restart_markers != "none" and task.split == "train"
    for sample, label in zip(task.samples, task.labels, strict=True):
        try:
            try:
                data = sample.opener()
            except PermissionError as exc:
                raise RejectedImage(f"unreadable: permission denied ({exc.strerror or exc})") from None
            except OSError as exc:
                raise RejectedImage(f"unreadable: {exc.strerror or exc}") from None
            image, height, width, changed = normalize_image(
                data, max_side=side, jpeg_quality=jpeg_quality, max_pixels=max_pixels
            )
        except RejectedImage as exc:
            rejected.append([sample.key, sample.split, str(exc)])
            continue
        reencoded += changed
        if restarts:
            image, done = add_restarts(image, restart_markers)
            transcoded += done
        columns["image"].append(image)
        columns["label"].append(label)
        columns["wnid"].append(sample.wnid)
        columns["key"].append(sample.key)
        columns["height"].append(height)
        columns["width"].append(width)
    blob = encode_shard(columns)
    location = runtime.join(out_dir, task.path)
    if not runtime.is_uri(out_dir):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
    runtime.write_atomic(location, blob)
    return ShardResult(
        split=task.split,
        index=task.index,
        path=task.path,
        rows=len(columns["key"]),
        sha256=hashlib.sha256(blob).hexdigest(),
        nbytes=len(blob),
        class_counts=dict(sorted(Counter(columns["wnid"]).items())),
        reencoded=reencoded,
        rejected=rejected,
        restart_transcoded=transcoded,
    )


# ILSVRC-2012's validation set: 50 images of each of its 1,000 classes. A published top-1/top-5 error is
# measured on exactly these 50,000; a number from fewer images is not comparable, however few are missing.
IMAGENET_CLASSES = 1000
IMAGENET_VAL_PER_CLASS = 50


def check_imagenet_val(layout: str, val_counts: dict[str, int], rejected_at: str) -> None:
    """Raise DataError unless a full ImageNet (the kaggle or ilsvrc_tar layout with all IMAGENET_CLASSES
    classes) has exactly IMAGENET_VAL_PER_CLASS val images in every class. Other datasets and class subsets
    pass: their val set is whatever the user gave."""
    if layout not in ("kaggle", "ilsvrc_tar") or len(val_counts) != IMAGENET_CLASSES:
        return
    wrong = {w: n for w, n in sorted(val_counts.items()) if n != IMAGENET_VAL_PER_CLASS}
    if not wrong:
        return
    shown = ", ".join(f"{w} has {n}" for w, n in list(wrong.items())[:5]) + (", ..." if len(wrong) > 5 else "")
    total = sum(val_counts.values())
    raise DataError(
        f"ImageNet's val split must hold {IMAGENET_VAL_PER_CLASS} images in each of its {IMAGENET_CLASSES} "
        f"classes ({IMAGENET_CLASSES * IMAGENET_VAL_PER_CLASS:,}), so that its error compares with published "
        f"ones; this one has {total:,}, and {len(wrong)} class(es) differ: {shown}. Missing or rejected val "
        f"images are listed in {rejected_at}"
    )


# -------------------------------------------------------------------------------------------------- plan


def _source_fingerprint(listing: SourceListing) -> str:
    """sha256 of the listing: every key with its size and mtime, plus the listing-time rejections."""
    h = hashlib.sha256()
    h.update(f"layout\t{listing.layout}\n".encode())
    for c in listing.classes:
        h.update(f"class\t{c.index}\t{c.wnid}\t{c.name}\n".encode())
    for s in listing.samples:
        h.update(f"{s.split}\t{s.key}\t{s.wnid}\t{s.size}\t{s.mtime_ns}\n".encode())
    for r in listing.rejected:
        h.update(f"rejected\t{r.split}\t{r.key}\t{r.reason}\n".encode())
    return h.hexdigest()


def carve_minival(listing: SourceListing, per_class: int, seed: int) -> frozenset[str]:
    """The keys of the minival split: `per_class` train images of every class, drawn from the class's sorted
    keys with a generator seeded by (seed, class index), so a class's draw depends on nothing but its own
    images (adding a class or an image of another class leaves it alone). Raises DataError naming the class
    and data.minival_per_class when a class would keep no train image."""
    if per_class <= 0:
        return frozenset()
    by_class: dict[str, list[str]] = {c.wnid: [] for c in listing.classes}
    for s in listing.samples:
        if s.split == "train":
            by_class.setdefault(s.wnid, []).append(s.key)
    labels = listing.label_of()
    keys: set[str] = set()
    for wnid, members in sorted(by_class.items()):
        if len(members) <= per_class:
            raise DataError(
                f"class {wnid} has {len(members)} train images: data.minival_per_class={per_class} would hold "
                f"out all of them; lower data.minival_per_class (0 = no minival split)"
            )
        members.sort()
        order = np.random.default_rng([seed, labels[wnid]]).permutation(len(members))
        keys.update(members[i] for i in order[:per_class])
    return frozenset(keys)


def plan_shards(
    listing: SourceListing, rows_per_shard: int, shuffle_seed: int, minival: frozenset[str] = frozenset()
) -> list[ShardTask]:
    """Assign samples to shards: sorted by key, shuffled with a fixed seed, cut into `rows_per_shard` runs.
    Train samples whose key is in `minival` go to the minival split's shards instead.

    Shuffling before cutting mixes the classes inside every shard (a file-level shuffle at ingest then
    suffices), and the assignment depends only on the listing and the options, never on the worker count.
    """
    labels = listing.label_of()
    tasks: list[ShardTask] = []

    def split_of(s: Sample) -> str:
        return MINIVAL if s.split == "train" and s.key in minival else s.split

    for split_code, split in enumerate(("train", "val", MINIVAL)):  # codes 0, 1 as before minival existed
        samples = sorted((s for s in listing.samples if split_of(s) == split), key=lambda s: s.key)
        order = np.random.default_rng([shuffle_seed, split_code]).permutation(len(samples))
        shuffled = [samples[i] for i in order]
        for index, start in enumerate(range(0, len(shuffled), rows_per_shard)):
            chunk = tuple(shuffled[start : start + rows_per_shard])
            tasks.append(
                ShardTask(
                    split, index, f"{split}/{index:05d}.parquet", chunk, tuple(labels[s.wnid] for s in chunk)
                )
            )
    return tasks


def _done_path(out: str, split: str, index: int) -> str:
    return runtime.join(out, DONE_DIR, f"{split}-{index:05d}.json")


def _finished(out: str, task: ShardTask, done_sizes: dict[str, int], shard_sizes: dict[str, int]) -> ShardResult | None:
    """The recorded result of a shard written by an earlier run of this plan, if the shard still matches
    (size from the folder listing, then its sha256: resuming re-reads only what an earlier run finished)."""
    done = _done_path(out, task.split, task.index)
    name = task.path.rpartition("/")[2]
    if done.rpartition("/")[2] not in done_sizes or name not in shard_sizes:
        return None
    try:
        result = ShardResult(**json.loads(runtime.read_bytes(done)))
    except (ValueError, TypeError, OSError):
        return None
    if shard_sizes[name] != result.nbytes:
        return None
    if hashlib.sha256(runtime.read_bytes(runtime.join(out, task.path))).hexdigest() != result.sha256:
        return None
    return result


def _remove_outputs(out: str) -> None:
    """Delete what an earlier prepare wrote here (and only that), manifest first."""
    for name in (MANIFEST, REJECTED, PLAN):
        runtime.delete(runtime.join(out, name))
    for name in runtime.list_files(runtime.join(out, DONE_DIR)):
        if name.endswith((".json", ".tmp")):
            runtime.delete(runtime.join(out, DONE_DIR, name))
    for split in PREPARED_SPLITS:
        for name in runtime.list_files(runtime.join(out, split)):
            if name.endswith((".parquet", ".tmp")):
                runtime.delete(runtime.join(out, split, name))


def _write_rejected(path: str, rejected: Sequence[Rejection]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["key", "split", "reason"])
    for r in sorted(rejected, key=lambda r: (r.split, r.key)):
        writer.writerow([r.key, r.split, r.reason])
    runtime.write_atomic(path, buf.getvalue().encode())


def _mp_context() -> multiprocessing.context.BaseContext:
    # forkserver/spawn, never fork: the parent may hold threads (pyarrow, torch pools), and forking a
    # threaded process can deadlock the child.
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # Workers fork from a server that has imported this module once (numpy, pyarrow, PIL), instead of each
    # importing it again (takes effect when the forkserver starts: the first pool of the process).
    ctx.set_forkserver_preload([__name__])
    return ctx


# ------------------------------------------------------------------------------------------------- entry


def same_dataset(manifest: Manifest, raw_dir: str | os.PathLike[str], layout: str) -> bool:
    """Whether a manifest was prepared from this raw dataset (same folder, same layout), whatever the options."""
    source = manifest.get("source") or {}
    old = str(source.get("raw_dir", ""))
    new = os.fspath(raw_dir)
    norm = (lambda p: p.rstrip("/")) if runtime.is_uri(new) else os.path.abspath
    return source.get("layout") == layout and bool(old) and norm(old) == norm(new)


def dataset_shards_dir(base: str, raw_dir: str | os.PathLike[str]) -> str:
    """A shards folder of its own for a raw dataset named on the command line: `BASE-<name>-<hash>` next to
    `base` (params' data.shards_dir), so that preparing it never touches the DVC pipeline's shards."""
    raw = os.fspath(raw_dir)
    full = raw.rstrip("/") if runtime.is_uri(raw) else os.path.abspath(raw)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(full.rstrip("/"))) or "data"
    return f"{base.rstrip('/')}-{name}-{hashlib.sha256(full.encode()).hexdigest()[:8]}"


def _refuse_other_dataset(out: str, old: dict[str, Any], raw_dir: str | os.PathLike[str], layout: str) -> None:
    src = old.get("source") or {}
    raise DataError(
        f"{out} holds another complete dataset: {old.get('num_classes')} classes prepared from "
        f"{src.get('raw_dir')} ({src.get('layout')}, fingerprint {str(old.get('fingerprint'))[:8]}); this run "
        f"would prepare {os.fspath(raw_dir)} ({layout}) there and delete it. Refusing. To replace it on purpose, "
        f"run `python -m stages.prepare --replace` (prepare_shards(..., replace=True)) or delete {out} first; "
        "to keep both, point data.shards_dir at another folder."
    )


def _use_ray(prepare_on: str) -> bool:
    if prepare_on == "ray":
        return True
    return prepare_on == "auto" and bool(os.environ.get("RAY_ADDRESS"))


def _run_ray(todo: list[ShardTask], out: str, max_side: int, jpeg_quality: int, record: Any, bar: Any,
             max_pixels: int = DEFAULT_MAX_PIXELS, restart_markers: str = "none") -> None:
    """One Ray task per shard, anywhere in the cluster (raw_dir and out_dir must be reachable from every node:
    a shared filesystem or a URI). Each task's output is a pure function of its samples, so where and in which
    order tasks run never changes the bytes; results are recorded as they finish, so a killed run resumes."""
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            repo = str(Path(__file__).resolve().parents[2])  # tasks import `pipeline` from the repository root
            ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": repo}})
    remote = ray.remote(num_cpus=1, max_retries=2)(build_shard)
    pending = {remote.remote(task, out, max_side, jpeg_quality, max_pixels, restart_markers): task
               for task in todo}
    try:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            for ref in finished:
                task = pending.pop(ref)
                record(ray.get(ref))  # re-raises a task's exception; finished shards stay recorded
                bar.update(len(task.samples))
    finally:
        for ref in pending:
            ray.cancel(ref)


class _ShardProgress:
    """prepare's progress, told once per finished shard (`update(images in it)`): a tqdm bar on an interactive
    terminal, else plain lines (pipeline.progress: every 10% of the shards or minute, and at the end) that stay
    readable in `dvc repro` and `ray job logs` output. Nothing when `enabled` is false."""

    def __init__(self, shards: int, shards_done: int, images: int, images_done: int, enabled: bool) -> None:
        import sys

        tty = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=images, initial=images_done, unit="img", desc="prepare", disable=not tty)
        self._lines = Progress("prepare", shards, "shards", done=shards_done, images=images_done,
                               out=print_line if enabled and not tty else None)

    def update(self, images: int) -> None:
        self._bar.update(images)
        self._lines.advance(1, images=images)

    def __enter__(self) -> _ShardProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


def prepare_shards(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    source: str = "auto",
    classes: Sequence[str] = (),
    first_n_classes: int | None = None,
    max_per_class: int | None = None,
    max_side: int = 512,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    jpeg_quality: int = 90,
    rows_per_shard: int = 1024,
    workers: int = 2,
    max_rejected: float = 0.001,
    progress: bool = True,
    shuffle_seed: int = 0,
    replace: bool = False,
    prepare_on: str = "auto",
    minival_per_class: int = 0,
    minival_seed: int = 0,
    restart_markers: str = "none",
) -> Manifest:
    """Prepare `raw_dir` into Parquet shards under `out_dir` (a path or a URI); returns the manifest (also
    written there, last).

    `max_rejected` < 1 is a fraction of the inputs, >= 1 a count; more rejections raise DataError after
    rejected.csv is written (no manifest then). `prepare_on`: "local" (a pool of `workers` processes), "ray"
    (one task per shard on the Ray cluster) or "auto" (Ray when RAY_ADDRESS is set). `workers`, `prepare_on`
    and `progress` never change the output. `replace`: allow deleting another raw dataset's complete shards.
    `minival_per_class` > 0: hold that many train images of every class out as the minival split
    (`carve_minival`, drawn with `minival_seed`); the manifest's train split is then train minus minival.
    `restart_markers` "mcu" / "rows": train images get restart markers, losslessly (`add_restarts`).
    """
    if rows_per_shard < 1 or workers < 1 or max_side < 1 or not 1 <= jpeg_quality <= 100:
        raise DataError("rows_per_shard, workers, max_side must be >= 1 and jpeg_quality in [1, 100]")
    if minival_per_class < 0 or minival_seed < 0:
        raise DataError(f"minival_per_class and minival_seed must be >= 0, not {minival_per_class}, {minival_seed}")
    if prepare_on not in ("auto", "local", "ray"):
        raise DataError(f"prepare_on must be auto, local or ray, not {prepare_on!r}")
    if restart_markers not in RESTART_MARKERS:
        raise DataError(f"restart_markers must be one of {', '.join(RESTART_MARKERS)}, not {restart_markers!r}")
    if restart_markers != "none":
        from pipeline.data import jpeg

        if not jpeg.available():
            raise DataError("data.restart_markers needs the native JPEG library (pipeline/data/native/roijpeg.c): "
                            "build it with `make setup`, or set data.restart_markers: none")
    # Listed from an absolute path: the samples' openers then work in any process, including Ray tasks, whose
    # working directory is not this one (the manifest still records raw_dir as given).
    local_raw = raw_dir if "://" in os.fspath(raw_dir) else os.path.abspath(raw_dir)
    listing = list_source(
        local_raw, source, classes=classes, first_n_classes=first_n_classes, max_per_class=max_per_class
    )
    options = {
        "layout": listing.layout,
        "classes": sorted(classes),
        "first_n_classes": first_n_classes,
        "max_per_class": max_per_class,
        "max_side": max_side,
        "val_max_side": None,  # val keeps its original size whatever max_side (build_shard)
        "jpeg_quality": jpeg_quality,
        "rows_per_shard": rows_per_shard,
        "shuffle_seed": shuffle_seed,
        "minival_per_class": minival_per_class,
        "minival_seed": minival_seed,
        # Only when not the default: datasets prepared before the budget existed keep their fingerprint.
        **({"max_pixels": max_pixels} if max_pixels != DEFAULT_MAX_PIXELS else {}),
        **({"restart_markers": restart_markers} if restart_markers != "none" else {}),
        "row_group_rows": ROW_GROUP_ROWS,
        "pyarrow": pa.__version__,  # Parquet bytes may differ across pyarrow versions
        "manifest_version": MANIFEST_VERSION,
    }
    source_fp = _source_fingerprint(listing)
    fingerprint = hashlib.sha256(
        json.dumps({"source": source_fp, "options": options}, sort_keys=True).encode()
    ).hexdigest()

    out = os.fspath(out_dir).rstrip("/") if runtime.is_uri(out_dir) else os.path.abspath(out_dir)
    runtime.makedirs(out)
    try:
        same_plan = json.loads(runtime.read_bytes(runtime.join(out, PLAN))).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        same_plan = False
    manifest_at = runtime.join(out, MANIFEST)
    if not same_plan and not replace:
        try:
            old = json.loads(runtime.read_bytes(manifest_at))
        except (OSError, ValueError):
            old = None  # no complete dataset here (an interrupted prepare's leftovers may go)
        other = isinstance(old, dict) and old.get("fingerprint") != fingerprint
        if other and not same_dataset(old, raw_dir, listing.layout):
            _refuse_other_dataset(out, old, raw_dir, listing.layout)
    # Planned after the refusal above: a dataset too small for the minival split never masks that message.
    minival = carve_minival(listing, minival_per_class, minival_seed)
    tasks = plan_shards(listing, rows_per_shard, shuffle_seed, minival)
    if same_plan:
        runtime.delete(manifest_at)  # a manifest there must always mean "complete"
        for name in runtime.list_files(runtime.join(out, DONE_DIR)):  # a killed run's half-written records
            if name.endswith(".tmp"):
                runtime.delete(runtime.join(out, DONE_DIR, name))
    else:
        _remove_outputs(out)
        plan = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "shards": [t.path for t in tasks]}
        runtime.write_json(runtime.join(out, PLAN), plan)
    planned = {t.path for t in tasks}
    shard_sizes: dict[str, dict[str, int]] = {}
    for split in PREPARED_SPLITS:
        runtime.makedirs(runtime.join(out, split))
        present = runtime.list_files(runtime.join(out, split))
        for name in present:  # stale temp files and shards of no task in this plan
            if name.endswith(".tmp") or (name.endswith(".parquet") and f"{split}/{name}" not in planned):
                runtime.delete(runtime.join(out, split, name))
        shard_sizes[split] = present
    runtime.makedirs(runtime.join(out, DONE_DIR))
    done_sizes = runtime.list_files(runtime.join(out, DONE_DIR)) if same_plan else {}

    results: dict[str, ShardResult] = {}
    todo: list[ShardTask] = []
    for task in tasks:
        prior = _finished(out, task, done_sizes, shard_sizes[task.split]) if same_plan else None
        if prior is None:
            todo.append(task)
        else:
            results[task.path] = prior
    n_images = sum(len(t.samples) for t in tasks)
    done_images = sum(len(t.samples) for t in tasks if t.path in results)

    def record(result: ShardResult) -> None:
        results[result.path] = result
        runtime.write_json(_done_path(out, result.split, result.index), asdict(result))

    with _ShardProgress(len(tasks), len(results), n_images, done_images, progress) as bar:
        if todo and _use_ray(prepare_on):
            _run_ray(todo, out, max_side, jpeg_quality, record, bar, max_pixels, restart_markers)
        elif workers == 1 or len(todo) <= 1:
            for task in todo:
                record(build_shard(task, out, max_side, jpeg_quality, max_pixels, restart_markers))
                bar.update(len(task.samples))
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=_mp_context(),
                                       initializer=runtime.exit_with, initargs=(os.getpid(),))
            try:
                pending: dict[Future[ShardResult], ShardTask] = {
                    pool.submit(build_shard, task, out, max_side, jpeg_quality, max_pixels, restart_markers): task
                    for task in todo
                }
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        task = pending.pop(fut)
                        record(fut.result())  # re-raises a worker's exception; finished shards stay recorded
                        bar.update(len(task.samples))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    ordered = [results[t.path] for t in tasks]
    rejected = list(listing.rejected) + [Rejection(*r) for res in ordered for r in res.rejected]
    _write_rejected(runtime.join(out, REJECTED), rejected)
    n_inputs = len(listing.samples) + len(listing.rejected)
    limit = max_rejected * n_inputs if max_rejected < 1 else max_rejected
    if len(rejected) > limit:
        raise DataError(
            f"{len(rejected)} of {n_inputs} inputs from {os.fspath(raw_dir)} were rejected, more than "
            f"data.max_rejected={max_rejected:g} allows; the reasons are in {runtime.join(out, REJECTED)}"
        )

    splits: dict[str, Any] = {}
    for split in PREPARED_SPLITS:
        mine = [r for r in ordered if r.split == split]
        counts: Counter[str] = Counter()
        for r in mine:
            counts.update(r.class_counts)
        splits[split] = {
            "n_images": sum(r.rows for r in mine),
            "n_reencoded": sum(r.reencoded for r in mine),
            "class_counts": {c.wnid: counts.get(c.wnid, 0) for c in listing.classes},
            "shards": [{"path": r.path, "rows": r.rows, "nbytes": r.nbytes, "sha256": r.sha256} for r in mine],
        }
        if restart_markers != "none":
            splits[split]["n_restart_transcoded"] = sum(r.restart_transcoded for r in mine)
    check_imagenet_val(listing.layout, splits[VAL]["class_counts"], runtime.join(out, REJECTED))
    # How minival was drawn, and a digest of exactly which keys (the shards hold the keys themselves): enough
    # to check that two runs held out the same images without listing 10,000 keys here.
    splits[MINIVAL].update({
        "carved_from": "train", "per_class": minival_per_class, "seed": minival_seed,
        "keys_sha256": hashlib.sha256("\n".join(sorted(minival)).encode()).hexdigest(),
    })
    manifest: Manifest = {
        "version": MANIFEST_VERSION,
        "source": {"layout": listing.layout, "raw_dir": os.fspath(raw_dir), "fingerprint": source_fp},
        "fingerprint": fingerprint,
        "classes": [{"index": c.index, "wnid": c.wnid, "name": c.name} for c in listing.classes],
        "num_classes": len(listing.classes),
        "splits": splits,
        "n_inputs": n_inputs,
        "rejected": len(rejected),
        "options": options,
    }
    write_manifest(out, manifest)
    return manifest


def prepare_from_params(d: Any, *, replace: bool = False, record: str | None = None) -> Manifest:
    """prepare_shards with the `data` section of params.yaml (pipeline.config.DataParams). `record`: also
    copy the manifest, byte for byte, to this local file (the DVC stage's output that downstream stages
    depend on: the dataset's identity wherever the shards live)."""
    # One writer per shards folder for the whole run: a second prepare on it refuses at once (OutputLocked).
    with runtime.output_lock(d.shards_dir):
        manifest = prepare_shards(
            d.raw_dir, d.shards_dir, source=d.source, classes=d.classes, first_n_classes=d.first_n_classes,
            max_per_class=d.max_per_class, max_side=d.max_side, max_pixels=d.max_pixels,
            jpeg_quality=d.jpeg_quality, rows_per_shard=d.rows_per_shard, workers=d.workers,
            max_rejected=d.max_rejected, replace=replace, prepare_on=d.prepare_on,
            minival_per_class=d.minival_per_class, minival_seed=d.minival_seed,
            restart_markers=d.restart_markers,
        )
        if record:
            from pipeline.data.shards import read_manifest_bytes

            Path(record).parent.mkdir(parents=True, exist_ok=True)
            runtime.write_atomic(str(Path(record).resolve()), read_manifest_bytes(d.shards_dir))
    return manifest
