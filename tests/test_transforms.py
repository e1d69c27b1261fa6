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
    normalize,
    random_resized_crop_box,
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


def test_ten_crop_shapes_and_mirror() -> None:
    crops = ten_crop_images(jpeg_bytes((80, 60), seed=1), 64, 48)
    assert crops.shape == (10, 3, 48, 48)
    assert np.array_equal(crops[5], crops[0][:, :, ::-1])


def test_normalize_channels_last() -> None:
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize(x, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]))
