"""Decode + augment JPEG bytes into uint8 NCHW batches; normalisation happens on the training device.

Why uint8 out of the data pipeline: the tensors that cross Ray's object store (and later the PCIe bus)
are 4x smaller than float32; normalising is one fused op on the worker (FFCV does the same).

The val path matches torchvision's `ImageClassification` preset (resize the shorter side with bilinear
+ antialias, center crop, normalise) exactly on the same JPEGs: tests/test_transforms.py checks it.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.data import jpeg

if TYPE_CHECKING:
    import torch

# No module-level torch import: Ray Data decode tasks import this module in fresh worker processes, and
# `import torch` alone costs ~2 s there (measured): val decoding never needs it, train decoding pays it once
# per worker process (`_train_image_tensor`), `normalize` runs on the training worker.

# Train images from this many pixels up decode through torchvision (`train_image`). Measured on one core, PIL vs
# torchvision per image: 48->32 px 0.20 vs 0.16 ms, 96->64 0.27 vs 0.22, 160->128 0.87 vs 0.47, 256->224 1.71 vs
# 0.99: from ~128x128 up, the ~2 s import is paid back within a few thousand images.
TENSOR_MIN_PIXELS = 128 * 128

# ImageNet statistics (torchvision's normalisation constants).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode JPEG bytes to RGB. With `min_side`, let libjpeg downscale by 1/2..1/8 in the DCT while
    the image stays >= min_side (PIL `draft`): ~2-4x faster decodes of ImageNet-size photos."""
    return _opened_to_rgb(Image.open(io.BytesIO(data)), min_side)


def _opened_to_rgb(img: Image.Image, min_side: int | None) -> Image.Image:
    """`decode_rgb` for an image whose header PIL has already read (`Image.open` decodes lazily)."""
    if min_side is not None and img.format == "JPEG":
        w, h = img.size
        scale = min(w, h) / float(min_side)
        if scale >= 2:
            img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
    return img.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area/aspect, else center crop.
    Returns (left, top, crop_w, crop_h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the whole image clipped to the ratio range (torchvision does the same).
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def scale_jitter_box(
    width: int, height: int, rng: np.random.Generator, crop: int, short_side: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The paper's scale augmentation (He et al. 2015 sec. 3.4, after Simonyan & Zisserman 2015): the image
    resized so its shorter side is S, drawn uniformly from the integers in `short_side` = [lo, hi], then a random
    `crop` x `crop` window of it. Returned as the window's box on the full-resolution image, (left, top, side,
    side) with side = crop x shorter / S, so every decode path resizes that box to `crop` as it does
    RandomResizedCrop's."""
    lo, hi = short_side
    s = int(rng.integers(lo, hi + 1))
    side = max(1, min(int(round(crop * min(width, height) / s)), width, height))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return left, top, side, side


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision F.resize(img, size) for an int size: shorter side -> size, longer side truncated."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision F.center_crop (pads with zeros when the image is smaller, like torchvision)."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _to_chw(img: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))  # (3, H, W)


def train_image(
    data: bytes, crop: int, rng: np.random.Generator, min_scale: float = 0.08, hflip: bool = True,
    scale_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """RandomResizedCrop(crop, scale=(min_scale, 1)) + horizontal flip -> uint8 (3, crop, crop); with
    `scale_range`, the paper's scale augmentation (`scale_jitter_box`) instead of RandomResizedCrop.

    Shards hold RGB JPEGs (prepare re-encodes everything else). With the ROI decoder (pipeline.data.jpeg, built by
    `make setup`) the box is drawn from the header's size and only the rows and iMCU columns around it are
    decoded (at 1/2..1/8 DCT scale when the box is at least twice the crop), then cropped exactly and resized
    as a uint8 tensor (torchvision's antialiased resize): `_train_image_roi`. Without it, torchvision's
    libjpeg-turbo binding decodes the whole image (`_train_image_tensor`): 1.6 ms vs 2.3 ms an image for PIL's
    decode + box resize at 500x375 -> 224 on one core of this machine. Small images (under TENSOR_MIN_PIXELS)
    stay on PIL either way: there the gain is ~0.04 ms an image, and the first tensor image costs a decode worker
    ~2 s of `import torch`. Without the ROI decoder, images at least twice the crop on their shorter side stay on
    PIL too, whose `draft` lets libjpeg decode them at 1/2..1/8 scale."""
    if len(data) and jpeg.available():
        try:
            width, height, _, space = jpeg.header(data)
        except jpeg.JpegError:
            width = height = space = 0  # not a JPEG libjpeg reads: the PIL path below decides (and names the error)
        if jpeg.decodable(space) and width * height >= TENSOR_MIN_PIXELS:
            return _train_image_roi(data, width, height, crop, rng, min_scale, hflip, scale_range)
    img = Image.open(io.BytesIO(data))  # reads the header only
    if (img.format == "JPEG" and img.mode == "RGB" and min(img.size) < 2 * crop
            and img.width * img.height >= TENSOR_MIN_PIXELS):
        return _train_image_tensor(data, img.width, img.height, crop, rng, min_scale, hflip, scale_range)
    img = _opened_to_rgb(img, min_side=crop)  # the header is parsed once per image
    (left, top, w, h), flip = draw_train_crop(img.width, img.height, rng, min_scale, hflip, scale_range, crop)
    # PIL resizes straight from the box: crop + resize in one pass, antialiased like torchvision's PIL path.
    out = img.resize((crop, crop), resample=Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_chw(out)


def draw_train_crop(
    width: int, height: int, rng: np.random.Generator, min_scale: float, hflip: bool,
    scale_range: tuple[int, int] | None = None, crop: int = 0,
) -> tuple[tuple[int, int, int, int], bool]:
    """The train transform's random draws for one image, in the order every path makes them: the crop box
    (left, top, w, h) on the full-resolution size -- RandomResizedCrop's, or with `scale_range` the paper's
    scale augmentation for a `crop`-pixel output -- then the flip."""
    if scale_range is not None:
        box = scale_jitter_box(width, height, rng, crop, scale_range)
    else:
        box = random_resized_crop_box(width, height, rng, (min_scale, 1.0), (3 / 4, 4 / 3))
    return box, bool(hflip and rng.random() < 0.5)


def crop_window_box(
    width: int, height: int, box: tuple[int, int, int, int], crop: int
) -> tuple[int, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """For a full-resolution crop box (left, top, w, h): (DCT denominator, region (x, y, w, h) to decode at that
    scale, the box as (top, left, h, w) relative to the region's top-left corner). The decoded window may start
    left of the region (iMCU alignment): add `x - x0` to the left offset.

    The box is mapped to the scaled image and rounded to whole pixels there: at 1/s an endpoint moves by at
    most s/2 full-resolution pixels, below a pixel of the crop's output whenever s > 1 (the box is then at least
    2s times the crop)."""
    left, top, w, h = box
    denom = jpeg.dct_denom(w, h, crop)
    region, (fx0, fy0, fx1, fy1) = jpeg.region_for_box(width, height, left, top, w, h, denom)
    cx0, cy0, cx1, cy1 = round(fx0), round(fy0), round(fx1), round(fy1)
    return denom, region, (cy0, cx0, cy1 - cy0, cx1 - cx0)


def resized_crop_window(
    window: torch.Tensor, inner: tuple[int, int, int, int], crop: int, flip: bool
) -> torch.Tensor:
    """Exact crop `inner` = (top, left, h, w) of a decoded (C, H, W) uint8 window (C = 3, or 4 for RGBX, whose
    padding channel is dropped), antialiased bilinear resize to (crop, crop) (torchvision's tensor
    RandomResizedCrop), then the flip -> (3, crop, crop). Works on any device."""
    import torch
    from torchvision.transforms.v2 import functional as F  # noqa: N812 (torchvision's convention)

    top, left, h, w = inner
    x = window[:, top : top + h, left : left + w]
    if x.device.type == "cpu":
        # torch's vectorised uint8 antialiased resize (AVX2) runs only on contiguous channels-last input, in
        # 4-byte pixels: a strided or channels-first crop takes the generic kernel, ~1.5x slower here (same
        # pixels: tests/test_jpeg_decode.py compares the paths).
        x = x.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        out = F.resize(x, [crop, crop], antialias=True)[0]
    else:
        out = F.resize(x, [crop, crop], antialias=True)
    out = out[:3]
    return out.flip(-1) if flip else out


def _train_image_roi(
    data: bytes, width: int, height: int, crop: int, rng: np.random.Generator, min_scale: float, hflip: bool,
    scale_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """`train_image` decoding only the crop's region (pipeline.data.jpeg): the same draws in the same order."""
    box, flip = draw_train_crop(width, height, rng, min_scale, hflip, scale_range, crop)
    return crop_jpeg_roi(data, width, height, box, flip, crop).numpy()


def crop_jpeg_roi(
    data: bytes, width: int, height: int, box: tuple[int, int, int, int], flip: bool, crop: int
) -> torch.Tensor:
    """The train transform for drawn parameters: decode the region around `box` (full-resolution (left, top, w,
    h) of a width x height JPEG), crop it exactly, resize to `crop`, flip -> uint8 (3, crop, crop) CPU tensor."""
    import torch

    denom, (x, y, rw, rh), (top, left, h, w) = crop_window_box(width, height, box, crop)
    # RGBX: 4-byte pixels, the layout torch's vectorised uint8 resize works in (it would repack RGB into it).
    # Shards prepared with data.restart_markers decode only the box's restart intervals (stream surgery); any
    # other JPEG decodes as decode_region does (the same pixels either way).
    window, x0 = jpeg.decode_region_restart(data, x, y, rw, rh, denom, channels=4)
    pixels = torch.from_numpy(window).permute(2, 0, 1)  # (4, H, W) view of channels-last memory
    return resized_crop_window(pixels, (top, left + x - x0, h, w), crop, flip)


def _train_image_tensor(
    data: bytes, width: int, height: int, crop: int, rng: np.random.Generator, min_scale: float, hflip: bool,
    scale_range: tuple[int, int] | None = None,
) -> np.ndarray:
    """`train_image` for an RGB JPEG: the same random draws in the same order, on torchvision's tensor ops."""
    import torch  # imported on the first train image of a decode worker, not by the val-only path
    from torchvision.io import decode_jpeg

    pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # (3, H, W) uint8
    box, flip = draw_train_crop(width, height, rng, min_scale, hflip, scale_range, crop)
    left, top, w, h = box
    return resized_crop_window(pixels, (top, left, h, w), crop, flip).numpy()


def val_image(data: bytes, resize: int, crop: int) -> np.ndarray:
    """torchvision V1 eval protocol: resize shorter side to `resize`, center crop `crop` -> uint8 (3, c, c).

    Images whose shorter side is at least twice `resize` decode at a DCT scale of 1/2..1/8 (still >= resize, PIL
    `draft`): 2-4x cheaper decodes of large photos, pixels within a few levels of torchvision's full decode +
    resize (tests/test_jpeg_decode.py bounds it). Smaller images (ImageNet's typical 500x375 at resize 256)
    decode whole, so their tensors equal torchvision's preset exactly (tests/test_transforms.py)."""
    return _to_chw(center_crop(resize_shorter(decode_rgb(data, min_side=resize), resize), crop))


def ten_crop_images(data: bytes, resize: int, crop: int) -> np.ndarray:
    """The paper's 10-crop test (sec. 3.4 uses it at several scales; we use the single-scale variant):
    four corners + center, and their mirrors -> uint8 (10, 3, crop, crop)."""
    img = resize_shorter(decode_rgb(data), resize)
    w, h = img.size
    boxes = [(0, 0), (w - crop, 0), (0, h - crop), (w - crop, h - crop)]
    crops = [img.crop((x, y, x + crop, y + crop)) for x, y in boxes]
    crops.append(center_crop(img, crop))
    crops += [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in crops]
    return np.stack([_to_chw(c) for c in crops])


# Rows decoded per output block: a whole 1,024-row ImageNet shard decodes to ~150 MB at 224 px, so the fused
# task yields it in slices (peak memory of one slice, and the trainer gets its first rows sooner).
DECODE_BATCH = 64


def batch_slices(batch: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    """`batch` (columns of equal length) in consecutive slices of `size` rows: the unit each decode seeds."""
    n = len(batch["key"])
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, n, size)]


def batch_seed(seed: int, epoch: int, keys: Sequence[str]) -> int:
    """A per-batch seed from (seed, epoch, first key): reproducible augmentation whatever the scheduling."""
    first = str(keys[0]) if len(keys) else ""
    return (seed * 1_000_003 + epoch * 7919 + zlib.crc32(first.encode())) & 0xFFFFFFFF


_STATS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and 1/std in 0..255 units, built once per device (not a host-to-device copy per batch)."""
    import torch

    key = str(device)
    if key not in _STATS:
        mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        _STATS[key] = (mean.to(device), inv_std.to(device))
    return _STATS[key]


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with ImageNet mean/std, on images' device."""
    import torch

    mean, inv_std = _stats(images.device)
    out = (images.float() - mean) * inv_std
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
