"""A generated, clearly SYNTHETIC image set in Kaggle's ImageNet layout, so the whole pipeline runs offline.

Each class is a combination of shape x colour x texture (x an optional dark outline beyond 600 classes).
The first classes are chosen so that any two differ in at least two of shape / colour / texture, which keeps
the task learnable by a ResNet-18 from 32 px crops, while random backgrounds (colour, gradient, blotches),
random position, scale (35-80 % of the side) and rotation, colour jitter and pixel noise keep it from being
trivial. Wnids (`s00000000`, `s00000001`, ...) start with "s" so they can never be mistaken for ImageNet's
"n........" wnids, yet sort the same way.

Output is deterministic: the same arguments give byte-identical files whatever `workers` is, because every
image draws from its own generator seeded by (seed, split, class, number).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.sources import KAGGLE_MAPPING, KAGGLE_SOLUTION, SYNTHETIC_README, DataError
from pipeline.runtime import exit_with, publish_dir

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "bar")
# Hues spread around the wheel, plus white; all bright enough to stand out from the dimmed backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "lime": (150, 230, 50),
    "green": (30, 160, 60),
    "teal": (20, 170, 160),
    "cyan": (70, 210, 245),
    "blue": (40, 70, 225),
    "purple": (135, 55, 205),
    "magenta": (225, 50, 185),
    "pink": (250, 160, 200),
    "white": (245, 245, 245),
}
TEXTURES = ("solid", "stripes", "dots", "checks", "grid")
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES) * 2  # x2: with and without an outline
# Fixed, so class k means the same thing for every seed (the ResNet paper's arXiv date).
_CLASS_ORDER_SEED = 20151210
_JPEG_QUALITY = 90
_SUPERSAMPLE = 2  # draw masks at 2x and shrink: anti-aliased edges like a photo's


@dataclass(frozen=True)
class SyntheticClass:
    wnid: str
    shape: str
    colour: str
    texture: str
    outlined: bool

    @property
    def name(self) -> str:
        words = ["synthetic", self.colour, self.shape]
        if self.texture != "solid":
            words.append(f"with {self.texture}")
        if self.outlined:
            words.append("outlined")
        return " ".join(words)


def synthetic_classes(num_classes: int) -> list[SyntheticClass]:
    """The first `num_classes` classes, in a fixed order independent of the seed.

    A greedy pass over a fixed random order of (shape, colour, texture) keeps only combinations that differ
    from every kept one in at least two attributes (at most 50 such classes exist: 10 shapes x 5 textures);
    the remaining combinations follow, then the same ones with an outline.
    """
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
    combos = list(itertools.product(range(len(SHAPES)), range(len(COLOURS)), range(len(TEXTURES))))
    order = np.random.default_rng(_CLASS_ORDER_SEED).permutation(len(combos))
    shuffled = [combos[i] for i in order]
    distinct: list[tuple[int, int, int]] = []
    for combo in shuffled:
        if all(sum(a != b for a, b in zip(combo, kept, strict=True)) >= 2 for kept in distinct):
            distinct.append(combo)
    chosen = set(distinct)
    ordered = [(c, False) for c in distinct]
    ordered += [(c, False) for c in shuffled if c not in chosen]
    ordered += [(c, True) for c in distinct] + [(c, True) for c in shuffled if c not in chosen]
    colour_names = list(COLOURS)
    return [
        SyntheticClass(f"s{i:08d}", SHAPES[s], colour_names[c], TEXTURES[t], outlined)
        for i, ((s, c, t), outlined) in enumerate(ordered[:num_classes])
    ]


# ------------------------------------------------------------------------------------------------ drawing


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape of radius r, rotated by `angle`; None for the round shapes."""
    if shape == "square":
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * 0.75, y * 0.75) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "diamond":
        pts = [(0.55, 0), (0, 1), (-0.55, 0), (0, -1)]
    elif shape == "bar":
        pts = [(0.35, 1), (-0.35, 1), (-0.35, -1), (0.35, -1)]
    elif shape == "star":
        pts = [
            (rad * math.cos(k * math.pi / 5 + math.pi / 2), rad * math.sin(k * math.pi / 5 + math.pi / 2))
            for k, rad in zip(range(10), itertools.cycle((1.0, 0.42)), strict=False)
        ]
    elif shape == "cross":
        w = 0.33
        pts = [
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
        ]
    else:
        return None
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in pts]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Coverage in [0, 1] of the shape, (H, W) float32, anti-aliased by supersampling."""
    k = _SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * k, cy * k, r * k
    poly = _polygon(shape, cx, cy, r, angle)
    if poly is not None:
        draw.polygon(poly, fill=255)
    elif shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.45 * r * math.cos(angle), cy + 0.45 * r * math.sin(angle)
        inner = r * 0.8
        draw.ellipse((ox - inner, oy - inner, ox + inner, oy + inner), fill=0)
    else:
        raise ValueError(f"unknown shape {shape}")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _texture(
    texture: str, size: int, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> np.ndarray:
    """Where the texture's dark colour goes, (H, W) float32 in [0, 1]; the pattern turns with the object."""
    if texture == "solid":
        return np.zeros((size, size), np.float32)
    # About 3-4 periods across the object: coarse enough to survive a 32 px crop of a 48 px image.
    period = 2 * r / rng.uniform(3.0, 4.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / period
    v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / period
    if texture == "stripes":
        pattern = np.floor(2 * u) % 2
    elif texture == "checks":
        pattern = (np.floor(2 * u) + np.floor(2 * v)) % 2
    elif texture == "dots":
        pattern = ((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < 0.32**2).astype(np.float32)
    elif texture == "grid":
        pattern = ((u % 1 < 0.3) | (v % 1 < 0.3)).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {texture}")
    return pattern.astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A dimmed, desaturated random colour + a linear gradient + low-frequency blotches, (H, W, 3) float32."""
    base = rng.uniform(25, 190, 3)
    base = base.mean() + (base - base.mean()) * 0.5
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    ramp = xx * math.cos(theta) + yy * math.sin(theta)  # (H, W) in about [-0.7, 0.7]
    bg = base[None, None, :] + ramp[..., None] * rng.uniform(-60, 60, 3)[None, None, :]
    blotches = rng.normal(0, 18, (4, 4, 3)).astype(np.float32)
    up = np.stack(
        [
            np.asarray(Image.fromarray(blotches[..., c]).resize((size, size), Image.Resampling.BICUBIC))
            for c in range(3)
        ],
        axis=-1,
    )
    return (bg + up).astype(np.float32)


def render_image(
    cls: SyntheticClass, size: int, rng: np.random.Generator
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of `cls` and the object's bounding box (x0, y0, x1, y1)."""
    scale = rng.uniform(0.35, 0.80)  # object diameter as a fraction of the side
    r = scale * size / 2
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    # Colour jitter: a brightness factor and a small per-channel shift; the hue stays recognisable.
    colour = np.asarray(COLOURS[cls.colour], np.float32) * rng.uniform(0.8, 1.1) + rng.normal(0, 10, 3)
    dark = colour * 0.3
    img = _background(size, rng)  # (H, W, 3)
    mask = _shape_mask(cls.shape, size, cx, cy, r, angle)
    if cls.outlined:
        m8 = Image.fromarray((mask * 255).astype(np.uint8))
        ring = np.asarray(m8.filter(ImageFilter.MaxFilter(5)), np.float32) / 255.0
        img = img * (1 - ring[..., None]) + 15.0 * ring[..., None]
    pattern = _texture(cls.texture, size, cx, cy, r, angle, rng)[..., None]
    obj = colour[None, None, :] * (1 - pattern) + dark[None, None, :] * pattern
    img = img * (1 - mask[..., None]) + obj * mask[..., None]
    img = img + rng.normal(0, 6, img.shape)
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(mask > 0.5)
    box = (
        (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        if len(xs)
        else (0, 0, size - 1, size - 1)
    )
    return Image.fromarray(pixels, "RGB"), box


# ------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class _Job:
    rel_path: str
    class_index: int
    split_code: int  # 0 train, 1 val: part of the per-image seed
    number: int


def _render_jobs(
    tmp_dir: str, jobs: list[_Job], classes: list[SyntheticClass], size: int, seed: int
) -> list[tuple[str, tuple[int, int, int, int]]]:
    boxes = []
    for job in jobs:
        rng = np.random.default_rng([seed, job.split_code, job.class_index, job.number])
        image, box = render_image(classes[job.class_index], size, rng)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
        Path(tmp_dir, job.rel_path).write_bytes(buf.getvalue())
        boxes.append((job.rel_path, box))
    return boxes


def _readme(classes: list[SyntheticClass], args: dict[str, int]) -> str:
    lines = [
        "THIS IS A SYNTHETIC DATASET. It is NOT ImageNet and contains no photographs.",
        "",
        "Generated by pipeline.data.synthetic.generate_synthetic_imagenet so that the pipeline can run",
        "end to end offline. It uses Kaggle's ImageNet folder layout (train/<wnid>/, a flat val/ labelled by",
        f"{KAGGLE_SOLUTION}, {KAGGLE_MAPPING}), but wnids start with 's' (synthetic) instead of 'n'.",
        "Each class is a shape x colour x texture combination drawn on a random background.",
        "Numbers measured on it say nothing about ImageNet accuracy.",
        "",
        "Arguments: " + ", ".join(f"{k}={v}" for k, v in args.items()),
        "",
        "Classes:",
    ]
    lines += [f"  {c.wnid}  {c.name}" for c in classes]
    return "\n".join(lines) + "\n"


def generate_synthetic_imagenet(
    out_dir: Path,
    *,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
    workers: int = 1,
) -> None:
    """Write the synthetic set to `out_dir` (replacing an earlier synthetic set there), atomically.

    The tree is built in a sibling temp folder and renamed into place, so an interrupted run never leaves a
    half tree. A non-empty `out_dir` that is not a synthetic set is refused rather than deleted.
    """
    out_dir = Path(out_dir)
    if min(train_per_class, val_per_class) < 1 or image_size < 16:
        raise DataError("train_per_class and val_per_class must be >= 1 and image_size >= 16")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SYNTHETIC_README).is_file():
        raise DataError(f"refusing to overwrite {out_dir}: it is not empty and not a generated synthetic set")
    classes = synthetic_classes(num_classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    try:
        jobs: list[_Job] = []
        for c, cls in enumerate(classes):
            (tmp / "train" / cls.wnid).mkdir(parents=True)
            jobs += [_Job(f"train/{cls.wnid}/{cls.wnid}_{n}.JPEG", c, 0, n) for n in range(train_per_class)]
        (tmp / "val").mkdir()
        # ImageNet's val numbering mixes the classes: shuffle which (class, n) gets which number.
        n_val = num_classes * val_per_class
        numbers = np.random.default_rng([seed, 1]).permutation(n_val) + 1
        val_labels: dict[str, str] = {}
        for i, (c, n) in enumerate(itertools.product(range(num_classes), range(val_per_class))):
            image_id = f"ILSVRC2012_val_{int(numbers[i]):08d}"
            val_labels[f"val/{image_id}.JPEG"] = classes[c].wnid
            jobs.append(_Job(f"val/{image_id}.JPEG", c, 1, n))

        boxes: dict[str, tuple[int, int, int, int]] = {}
        if workers <= 1:
            boxes.update(_render_jobs(str(tmp), jobs, classes, image_size, seed))
        else:
            chunk = max(1, math.ceil(len(jobs) / (workers * 4)))
            # forkserver: forking a parent that may hold threads (torch, pyarrow pools) is unsafe.
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=exit_with, initargs=(os.getpid(),)) as pool:
                futures = [
                    pool.submit(_render_jobs, str(tmp), jobs[i : i + chunk], classes, image_size, seed)
                    for i in range(0, len(jobs), chunk)
                ]
                for fut in futures:
                    boxes.update(fut.result())

        with (tmp / KAGGLE_SOLUTION).open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["ImageId", "PredictionString"])
            for rel in sorted(val_labels):
                x0, y0, x1, y1 = boxes[rel]
                writer.writerow([Path(rel).stem, f"{val_labels[rel]} {x0} {y0} {x1} {y1}"])
        (tmp / KAGGLE_MAPPING).write_text("".join(f"{c.wnid} {c.name}\n" for c in classes), encoding="utf-8")
        args = {
            "num_classes": num_classes,
            "train_per_class": train_per_class,
            "val_per_class": val_per_class,
            "image_size": image_size,
            "seed": seed,
        }
        (tmp / SYNTHETIC_README).write_text(_readme(classes, args), encoding="utf-8")

        publish_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
