"""The recipe keys after the crop (pipeline.data.augment, hooked into ingest.TrainDecode): each test goes from the
params key to the decoded pixels, so a key that were validated but ignored fails it (pixel statistics, sizes or
sample multiplicity would not change)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainParams
from pipeline.data.augment import ERASE_FILL, Augment, progressive_sizes, random_erase, resize_batch
from pipeline.data.ingest import TrainDecode, _recipe_options
from pipeline.data.shards import read_shard, shard_files


@pytest.fixture(scope="module")
def rows(synthetic_shards: Path) -> dict[str, np.ndarray]:
    """16 train rows (JPEG bytes, labels, keys) of the session's synthetic shards."""
    table = read_shard(shard_files(synthetic_shards, "train")[0], columns=["image", "label", "key"])
    return {"image": np.asarray(table.column("image").to_pylist(), dtype=object),
            "label": table.column("label").to_numpy(), "key": np.asarray(table.column("key").to_pylist())}


def decode(rows: dict[str, np.ndarray], epoch: int = 0, crop: int = 32, **train: object) -> np.ndarray:
    """One pass of TrainDecode built from params' train section exactly as train_dataset builds it (seeded rows,
    so two decodes differ only by what the keys change)."""
    tp = TrainParams(train_crop_size=crop, val_resize_size=crop, val_crop_size=crop, deterministic=True, **train)
    fn = TrainDecode(crop, 0.35, keep_keys=True, epoch=epoch, **_recipe_options(tp, crop, seed=0, epochs=4))
    return np.concatenate([b["image"] for b in fn(dict(rows))])


def changed_share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image, the share of its uint8 values that differ."""
    return (a != b).reshape(len(a), -1).mean(axis=1)


@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_auto_augment_changes_pixels_and_is_seeded(rows, policy: str) -> None:
    plain = decode(rows)
    aug = decode(rows, auto_augment=policy)
    assert aug.shape == plain.shape and aug.dtype == np.uint8
    share = changed_share(aug, plain)
    # TrivialAugmentWide picks one of 14 ops (Identity among them) at a random strength, RandAugment 2 of 14: most
    # of 16 images must come out changed, and changed substantially (the crop and flip are the same draws).
    assert (share > 0.2).sum() >= 10, share
    assert np.array_equal(decode(rows, auto_augment=policy), aug)  # seeded per (seed, epoch, key)
    assert not np.array_equal(decode(rows, epoch=1, auto_augment=policy), aug)


def test_ra_magnitude_reaches_randaugment(rows) -> None:
    weak = decode(rows, auto_augment="ra", ra_magnitude=0)
    strong = decode(rows, auto_augment="ra", ra_magnitude=25)
    plain = decode(rows)
    # Magnitude 0: the geometric and colour ops are (near) identities; 25: large rotations, shears, posterise...
    assert np.abs(strong.astype(int) - plain).mean() > 2 * np.abs(weak.astype(int) - plain).mean()


def test_random_erase_paints_a_mean_rectangle(rows) -> None:
    plain = decode(rows)
    erased = decode(rows, random_erase=1.0)
    fill = np.asarray(ERASE_FILL, dtype=np.uint8).reshape(3, 1, 1)
    for before, after in zip(plain, erased, strict=True):
        diff = (before != after).any(axis=0)  # (H, W)
        assert diff.any()
        ys, xs = np.nonzero(diff)
        box = after[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        assert (box == fill).all()  # one rectangle, the mean pixel everywhere in it
        assert 0.02 * 32 * 32 * 0.5 <= box[0].size <= 0.34 * 32 * 32
    assert np.array_equal(decode(rows, random_erase=0.0), plain)


def test_random_erase_probability_and_function_leave_input_alone() -> None:
    img = torch.full((3, 40, 40), 7, dtype=torch.uint8)
    rng = np.random.default_rng(0)
    outs = [random_erase(img, rng, 0.3) for _ in range(400)]
    erased = sum(int((o != 7).any()) for o in outs)
    assert 80 <= erased <= 160  # ~120 of 400 at p = 0.3
    assert (img == 7).all()  # a new tensor each time


def test_progressive_sizes_ramp_and_reach_the_decode(rows) -> None:
    sizes = progressive_sizes(10, 64, 32, 0.2, 0.8, 8)
    assert sizes[0] == sizes[1] == 32 and sizes[-1] == sizes[-2] == 64
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert progressive_sizes(5, 64, None) == [64] * 5
    with pytest.raises(ValueError, match="prog_resize_min_size"):
        progressive_sizes(5, 32, 64)
    # Through the params key to the pixels: epoch 0 decodes at the ramp's start, the last epoch at the end.
    first = decode(rows, epoch=0, prog_resize_min_size=16, prog_resize_step=8)
    last = decode(rows, epoch=3, prog_resize_min_size=16, prog_resize_step=8)
    assert first.shape[-2:] == (16, 16) and last.shape[-2:] == (32, 32)
    assert decode(rows, epoch=0).shape[-2:] == (32, 32)


def test_resize_batch_guard_keeps_uint8() -> None:
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert resize_batch(x, 32) is x
    y = resize_batch(x, 16)
    assert y.shape == (2, 3, 16, 16) and y.dtype == torch.uint8


def test_deterministic_rows_do_not_depend_on_batching(rows) -> None:
    tp = TrainParams(train_crop_size=32, val_resize_size=32, val_crop_size=32, deterministic=True,
                     auto_augment="ta_wide", random_erase=0.5)
    opts = _recipe_options(tp, 32, seed=3, epochs=2)
    whole = {k: img for b in TrainDecode(32, 0.35, keep_keys=True, epoch=1, **opts)(dict(rows))
             for k, img in zip(b["key"], b["image"], strict=True)}
    backwards = {k: v[::-1] for k, v in rows.items()}
    again = {k: img for b in TrainDecode(32, 0.35, keep_keys=True, epoch=1, **opts)(backwards)
             for k, img in zip(b["key"], b["image"], strict=True)}
    assert whole.keys() == again.keys() and all(np.array_equal(whole[k], again[k]) for k in whole)
    # Not deterministic: OS entropy, two decodes differ.
    loose = _recipe_options(tp.model_copy(update={"deterministic": False}), 32, seed=3, epochs=2)
    a, b = (np.concatenate([x["image"] for x in TrainDecode(32, 0.35, **loose)(dict(rows))]) for _ in range(2))
    assert not np.array_equal(a, b)


def test_repeated_augmentation_yields_distinct_copies(rows) -> None:
    keys = np.concatenate([b["key"] for b in TrainDecode(32, 0.35, keep_keys=True, epoch=0, ra_reps=3,
                                                        deterministic=True, seed=0)(dict(rows))])
    assert Counter(keys.tolist()) == {k: 3 for k in rows["key"].tolist()}
    images = decode(rows, ra_sampler=True, ra_reps=3)
    n = len(rows["key"])
    assert images.shape[0] == 3 * n
    assert not np.array_equal(images[:n], images[n : 2 * n])  # each copy its own crop/flip draws


def test_augment_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match="train.auto_augment"):
        Augment(policy="autoaug")


# --- through Ray Data: the pass index reaches the decode tasks, repeated augmentation keeps the epoch ---------


@pytest.fixture(scope="module")
def ray_2cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_ray_passes_ramp_resolution_and_repeat_images(ray_2cpus, synthetic_shards: Path) -> None:
    from pipeline.data.ingest import train_dataset

    files = shard_files(synthetic_shards, "train")
    n = sum(read_shard(f, columns=["key"]).num_rows for f in files)
    shard_keys = [set(read_shard(f, columns=["key"]).column("key").to_pylist()) for f in files]
    # deterministic: Ray Data keeps the blocks in the (seeded) file order, so which rows make the cut is the
    # ingest's doing, not the scheduler's.
    tp = TrainParams(train_crop_size=32, val_resize_size=32, val_crop_size=32, prog_resize_min_size=16,
                     prog_resize_ramp_start=0.0, prog_resize_ramp_end=1.0, prog_resize_step=8, ra_sampler=True,
                     ra_reps=4, deterministic=True)
    ds = train_dataset(files, crop=32, min_scale=0.35, seed=0, keep_keys=True, recipe=tp, epochs=3, n_rows=n)
    sizes, counts = [], []
    for _epoch in range(3):
        batches = list(ds.iter_batches(batch_format="numpy", batch_size=None))
        sizes.append({b["image"].shape[-1] for b in batches})
        counts.append(Counter(k for b in batches for k in b["key"].tolist()))
    # Ray Data's pass index is the epoch: 16 -> 24 -> 32 px, each pass at one size.
    assert sizes == [{16}, {24}, {32}]
    # 4 shards of 16 rows, each decode task yielding its shard's 4 copies in order: the pass, cut at n = 64 rows,
    # is exactly the first shard of this pass's file order, every image of it 4 times (DeiT's RASampler: n / reps
    # distinct images, each reps times).
    for c in counts:
        assert sum(c.values()) == n and set(c.values()) == {4}, c
        assert set(c) in shard_keys, sorted(c)


def test_pca_lighting_shifts_each_image_along_imagenets_colour_components(rows) -> None:
    plain = decode(rows).astype(int)
    lit = decode(rows, pca_lighting=0.1).astype(int)
    assert np.array_equal(decode(rows, pca_lighting=0.1), lit)  # seeded per (seed, epoch, key)
    shifted = 0
    for a, b in zip(plain, lit, strict=True):
        inside = ((a > 8) & (a < 247)).all(axis=0)  # pixels no channel of which can clip
        diff = (b - a)[:, inside]  # (3, pixels)
        # One RGB offset for the whole image (AlexNet adds the same vector to every pixel), up to rounding.
        assert (diff.max(axis=1) - diff.min(axis=1) <= 1).all(), diff
        shifted += bool(np.abs(diff).max() >= 1)
    assert shifted >= 12  # std 0.1 moves most images by >= 1 level (the first component: ~0.1 x 0.22 x 0.58 x 255)


def test_lighting_shift_is_the_eigenvector_sum() -> None:
    from pipeline.data.augment import PCA_EIGVAL, PCA_EIGVEC, lighting_shift

    alpha = np.random.default_rng(3).normal(0.0, 0.1, size=3)
    expected = [255 * sum(PCA_EIGVEC[c][i] * alpha[i] * PCA_EIGVAL[i] for i in range(3)) for c in range(3)]
    assert lighting_shift(np.random.default_rng(3), 0.1) == pytest.approx(expected)
    # The components are orthonormal: the PCA of a colour covariance, as AlexNet computes it.
    vec = np.asarray(PCA_EIGVEC)
    assert vec.T @ vec == pytest.approx(np.eye(3), abs=2e-3)


def test_train_scale_range_reaches_the_decode(rows) -> None:
    """train.train_scale_range replaces RandomResizedCrop in the decode tasks: another crop of every image, seeded
    like the rest of the recipe."""
    tp = TrainParams(train_crop_size=32, val_resize_size=32, val_crop_size=32, train_scale_range=[36, 64])
    assert _recipe_options(tp, 32, seed=0, epochs=4)["scale_range"] == [36, 64]
    plain = decode(rows)
    scaled = decode(rows, train_scale_range=[36, 64])
    assert scaled.shape == plain.shape
    assert np.array_equal(decode(rows, train_scale_range=[36, 64]), scaled)
    assert (changed_share(scaled, plain) > 0.5).sum() >= 14


def test_train_scale_range_is_checked() -> None:
    with pytest.raises(ValueError, match="train_scale_range"):
        TrainParams(train_crop_size=224, train_scale_range=[200, 480])
    with pytest.raises(ValueError, match="train_scale_range"):
        TrainParams(train_scale_range=[480, 256])
    with pytest.raises(ValueError, match="decode: worker"):
        TrainParams(train_scale_range=[256, 480], decode="worker")
