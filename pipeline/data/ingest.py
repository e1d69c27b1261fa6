"""Ray Data ingest: Parquet shards -> decoded, augmented uint8 batches, streamed to the training workers.

Decoding and augmentation run in `map_batches` tasks, not on the training worker, so that on a GPU node
the data CPUs and the GPU overlap. Train V2 splits the train dataset across workers
(`streaming_split(equal=True)`): each worker sees disjoint rows every epoch, the same count on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.transforms import batch_seed, ten_crop_images, train_image, val_image

# Half a logical CPU per read and per decode task. Smaller requests let Ray run many tasks at once, and on a
# small machine every extra task is a new Python worker process (~1-2 s of CPU to start): seen here as a
# dozen `ray::IDLE` processes eating the training workers' cores. Larger ones deadlock: with one CPU left to
# Ray Data (a 2-CPU Ray running a trial), a 1-CPU read task holds it and the 1-CPU decode task never runs
# (seen in tests/test_tuning.py). A read and a decode together fit in one CPU. The local Ray adds logical
# CPUs for data (pipeline.training.trainer.init_ray), so ingest never starves next to the workers.
DECODE_TASK_CPUS = 0.5
READ_TASK_CPUS = 0.5


class TrainDecode:
    """map_batches function: JPEG bytes -> RandomResizedCrop + flip, uint8 (N, 3, crop, crop)."""

    def __init__(self, crop: int, min_scale: float, seed: int | None = None) -> None:
        self.crop = crop
        self.min_scale = min_scale
        self.seed = seed
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = batch["key"]
        # seed None: fresh OS entropy per batch, so every epoch augments differently (Ray Data gives the
        # function no epoch number); a seed makes a single pass reproducible (tests, benchmarks).
        seed = None if self.seed is None else batch_seed(self.seed, self.calls, list(keys))
        self.calls += 1
        rng = np.random.default_rng(seed)
        images = np.stack([train_image(b, self.crop, rng, self.min_scale) for b in batch["image"]])
        return {"image": images, "label": batch["label"].astype(np.int64)}


class ValDecode:
    """map_batches function: JPEG bytes -> resize + center crop, uint8 (N, 3, crop, crop), keys kept."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize = resize
        self.crop = crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([val_image(b, self.resize, self.crop) for b in batch["image"]])
        return {"image": images, "label": batch["label"].astype(np.int64), "key": batch["key"]}


def _configure_data_context() -> None:
    """Ray 2.60's V2 Parquet datasource (ListFiles -> ReadFilesParquetV2) reads our shards as one block
    after a ~2.5 s listing task, every epoch: 3.8-6.4 s per pass over 1,000 images vs 0.6 s with the
    file-based datasource, which also streams (first batch after 0.2 s; measured here, see README).
    Progress bars only on a terminal: in logs (CI, `ray job logs`) they are thousands of redraw lines."""
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = sys.stderr.isatty()


def train_dataset(
    files: Sequence[str], *, crop: int, min_scale: float, seed: int, decode_batch: int = 64
) -> Any:
    """A lazy Ray Dataset over the train shards: the file order is reshuffled at every execution (epoch)."""
    import ray.data
    from ray.data import FileShuffleConfig

    _configure_data_context()
    ds = ray.data.read_parquet(
        list(files),
        columns=["image", "label", "key"],
        shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
        num_cpus=READ_TASK_CPUS,
    )
    return ds.map_batches(
        TrainDecode(crop, min_scale),
        batch_format="numpy",
        batch_size=decode_batch,
        num_cpus=DECODE_TASK_CPUS,
    )


class TenCropDecode:
    """map_batches function for the paper's 10-crop test: uint8 (N, 10, 3, crop, crop)."""

    def __init__(self, resize: int, crop: int) -> None:
        self.resize = resize
        self.crop = crop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([ten_crop_images(b, self.resize, self.crop) for b in batch["image"]])
        return {"image": images, "label": batch["label"].astype(np.int64), "key": batch["key"]}


def val_dataset(
    files: Sequence[str], *, resize: int, crop: int, ten_crop: bool = False, decode_batch: int = 64
) -> Any:
    """A lazy Ray Dataset of val images after the eval transform (1 center crop, or 10 crops), keys kept."""
    import ray.data

    _configure_data_context()
    ds = ray.data.read_parquet(
        list(files), columns=["image", "label", "key"], num_cpus=READ_TASK_CPUS
    )
    decode = TenCropDecode(resize, crop) if ten_crop else ValDecode(resize, crop)
    return ds.map_batches(decode, batch_format="numpy", batch_size=decode_batch, num_cpus=DECODE_TASK_CPUS)
