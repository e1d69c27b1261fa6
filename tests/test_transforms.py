"""Our val transform gives the same tensors as torchvision's ImageClassification preset on the same JPEGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms._presets import ImageClassification

from pipeline.data.transforms import (
    MEAN,
    STD,
    TENSOR_MIN_PIXELS,
    normalize,
    random_resized_crop_box,
    scale_jitter_box,
    ten_crop_images,
    train_image,
    val_image,
)
from tests.conftest import jpeg_bytes


@pytest.mark.parametrize("size, resize, crop", [((500, 375), 256, 224), ((375, 500), 256, 224),
                                                ((48, 48), 36, 32), ((61, 45), 36, 32), ((300, 200), 232, 224)])
def test_val_transform_matches_torchvision_preset(size: tuple[int, int], resize: int, crop: int) -> None:
    data = jpeg_bytes(size, seed=sum(size))
    ours = normalize(torch.from_numpy(val_image(data, resize, crop))[None])[0]  # (3, crop, crop)
    preset = ImageClassification(crop_size=crop, resize_size=resize, mean=MEAN, std=STD)
    theirs = preset(Image.open(io.BytesIO(data)).convert("RGB"))
    assert ours.shape == theirs.shape == (3, crop, crop)
    # uint8 round trip: torchvision converts to float after the PIL resize, as we do -> identical.
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_train_crop_is_deterministic_for_a_seed_and_in_bounds() -> None:
    data = jpeg_bytes((120, 90), seed=3)
    a = train_image(data, 32, np.random.default_rng(7), 0.35)
    b = train_image(data, 32, np.random.default_rng(7), 0.35)
    assert a.shape == (3, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = random_resized_crop_box(120, 90, rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and 0 <= top and left + w <= 120 and top + h <= 90 and w > 0 and h > 0


def test_train_tensor_path_matches_the_pil_path() -> None:
    """>= TENSOR_MIN_PIXELS and shorter side < 2 x crop: torchvision's decoder and tensor resize. Same draws (box,
    flip) as the PIL path and, within antialiasing round-off, the same pixels."""
    size, crop = (160, 120), 96
    assert size[0] * size[1] >= TENSOR_MIN_PIXELS and min(size) < 2 * crop  # the tensor path's conditions
    data = jpeg_bytes(size, seed=5)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    flips = 0
    for seed in range(8):
        ours = train_image(data, crop, np.random.default_rng(seed), 0.35)
        rng = np.random.default_rng(seed)
        left, top, w, h = random_resized_crop_box(*size, rng, (0.35, 1.0), (3 / 4, 4 / 3))
        ref = img.resize((crop, crop), resample=Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            flips += 1
        ref_chw = np.asarray(ref).transpose(2, 0, 1).astype(np.int16)
        assert ours.shape == (3, crop, crop) and ours.dtype == np.uint8
        assert np.abs(ours.astype(np.int16) - ref_chw).mean() < 2.0, seed
    assert 0 < flips < 8  # both branches ran


def test_scale_jitter_box_is_a_crop_of_the_image_resized_to_a_shorter_side_in_range() -> None:
    """He et al. sec. 3.4: shorter side S ~ U{256..480}, a random 224 crop. As a box on a 500x375 image: a square
    of side 224 x 375 / S, so from 224 x 375 / 480 = 175 (S = 480) to 224 x 375 / 256 = 328 (S = 256) pixels."""
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(2000):
        left, top, w, h = scale_jitter_box(500, 375, rng, 224, (256, 480))
        assert w == h and 0 <= left and 0 <= top and left + w <= 500 and top + h <= 375
        sides.append(w)
    assert min(sides) == 175 and max(sides) == 328
    # S is uniform over the integers: its implied values spread evenly over [256, 480].
    s = 224 * 375 / np.asarray(sides)
    assert abs(np.median(s) - 368) < 8 and np.mean(s < 312) == pytest.approx(0.25, abs=0.04)


@pytest.mark.parametrize("size, crop", [((160, 120), 96), ((64, 48), 32)])  # the tensor and the PIL path
def test_train_image_with_scale_range_crops_the_drawn_box(size: tuple[int, int], crop: int) -> None:
    data = jpeg_bytes(size, seed=9)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    lo, hi = crop + crop // 7, 2 * crop
    for seed in range(6):
        ours = train_image(data, crop, np.random.default_rng(seed), 0.35, scale_range=(lo, hi))
        rng = np.random.default_rng(seed)
        left, top, w, h = scale_jitter_box(*size, rng, crop, (lo, hi))
        ref = img.resize((crop, crop), resample=Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ref_chw = np.asarray(ref).transpose(2, 0, 1).astype(np.int16)
        assert ours.shape == (3, crop, crop)
        assert np.abs(ours.astype(np.int16) - ref_chw).mean() < 2.0, seed
    # Without the range the same seed draws RandomResizedCrop's box: another crop.
    plain = train_image(data, crop, np.random.default_rng(0), 0.35)
    assert not np.array_equal(plain, train_image(data, crop, np.random.default_rng(0), 0.35, scale_range=(lo, hi)))


def test_ten_crop_shapes_and_mirror() -> None:
    crops = ten_crop_images(jpeg_bytes((80, 60), seed=1), 64, 48)
    assert crops.shape == (10, 3, 48, 48)
    assert np.array_equal(crops[5], crops[0][:, :, ::-1])


def test_normalize_channels_last() -> None:
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]))
