"""`run_loop` without Ray: the train shards decoded in this process, reports kept in memory.

For runs so small that Ray's start-up would be most of the cost: the degradation experiment trains four
CIFAR-size networks for a few epochs inside a ~90 s budget on 2 cores, where `ray.init` plus a Ray Data cold
start per run (~5 s each, README "Performance") would eat a third of it. The training itself is
`pipeline.training.loop.run_loop`, unchanged: same optimiser, schedule, augmentation (`train_image`, the
function Ray Data's `TrainDecode` calls), evaluation, metrics and MLflow logging as the train stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data.ingest import ValDecode
from pipeline.data.shards import read_shard
from pipeline.data.transforms import draw_train_crop, train_image
from pipeline.data.worker_decode import image_size


class InMemoryShard:
    """The part of a Ray Data shard that `run_loop` uses (`iter_torch_batches`), over Parquet train shards
    read once into memory (JPEG bytes; a few MB for the embedded set). Each epoch is a full shuffle seeded by
    the loop's `local_shuffle_seed`, decoded and augmented with the project's `train_image`."""

    def __init__(self, files: Sequence[str], *, crop: int, min_scale: float, limit: int | None = None) -> None:
        images: list[bytes] = []
        labels: list[int] = []
        for path in files:
            table = read_shard(path, columns=["image", "label"])  # sha256 checked while read
            images += table.column("image").to_pylist()
            labels += [int(v) for v in table.column("label").to_pylist()]
            if limit is not None and len(images) >= limit:
                break
        # prepare shuffles rows across shards, so the first `limit` rows are a random subset of the classes.
        self.images = images[:limit] if limit is not None else images
        self.labels = np.asarray(labels[: len(self.images)], dtype=np.int64)
        self.crop = crop
        self.min_scale = min_scale

    def __len__(self) -> int:
        return len(self.images)

    def iter_torch_batches(
        self, *, batch_size: int, drop_last: bool = True, local_shuffle_seed: int | None = None,
        device: torch.device | str = "cpu", **_ray_options: Any,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches {"image": uint8 (N, 3, crop, crop), "label": int64 (N,)}. Ray-only options (dtypes,
        prefetch, shuffle buffer) are accepted and have nothing to do here."""
        rng = np.random.default_rng(local_shuffle_seed)
        order = rng.permutation(len(self.images))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            pixels = np.stack([train_image(self.images[i], self.crop, rng, self.min_scale) for i in index])
            yield {
                "image": torch.from_numpy(pixels).to(device),  # (N, 3, crop, crop) uint8
                "label": torch.from_numpy(self.labels[index]).to(device),
            }


    def iter_batches(
        self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = True,
        local_shuffle_seed: int | None = None, **_ray_options: Any,
    ) -> Iterator[dict[str, np.ndarray]]:
        """train.decode "worker": rows as Ray Data's TrainDraw ships them (JPEG bytes, drawn box, size, flip,
        label), for the loop's WorkerDecoder; the same shuffle and draw order as `iter_torch_batches`."""
        if batch_format != "numpy":
            raise ValueError(f"InMemoryShard.iter_batches: only batch_format='numpy', got {batch_format!r}")
        rng = np.random.default_rng(local_shuffle_seed)
        order = rng.permutation(len(self.images))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            sizes = [image_size(self.images[i]) for i in index]
            draws = [draw_train_crop(w, h, rng, self.min_scale, True) for w, h in sizes]
            yield {
                "jpeg": np.array([self.images[i] for i in index], dtype=object),
                "box": np.array([box for box, _ in draws], dtype=np.int32),
                "size": np.array(sizes, dtype=np.int32),
                "flip": np.array([flip for _, flip in draws], dtype=bool),
                "label": self.labels[index],
            }


class InMemoryValShard:
    """Val shards for `run_loop`'s validation in a plain process: the same decode as the evaluate stage
    (`pipeline.data.ingest.ValDecode`, resize + center crop), batches {"image": uint8 (N, 3, crop, crop),
    "label": int64 (N,)}. The Parquet files are read once; images are decoded at every pass."""

    def __init__(self, files: Sequence[str], *, resize: int, crop: int) -> None:
        self._decode = ValDecode(resize, crop)
        # sha256 checked while read; local paths and URIs alike
        self._tables = [read_shard(path, columns=["image", "label", "key"]) for path in files]

    def __len__(self) -> int:
        return sum(t.num_rows for t in self._tables)

    def iter_torch_batches(
        self, *, batch_size: int, device: torch.device | str = "cpu", **_ray_options: Any
    ) -> Iterator[dict[str, torch.Tensor]]:
        for table in self._tables:
            rows = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("image", "key")}
            rows["label"] = table.column("label").to_numpy()
            for start in range(0, table.num_rows, batch_size):
                part = {k: v[start : start + batch_size] for k, v in rows.items()}
                # `_decode` yields slices of ingest.DECODE_BATCH rows; joined again so that a batch has the
                # `batch_size` rows the caller asked for (and a record naming that batch measures it).
                slices = list(self._decode(part))
                yield {k: torch.from_numpy(np.concatenate([d[k] for d in slices])).to(device)
                       for k in ("image", "label")}


class InProcessSession:
    """The session `run_loop` talks to (see `TrainSession`), for a single process without Ray: no checkpoint
    to resume from, the model unwrapped, every report appended to `reports` (with its `time.perf_counter()`
    in `report_times`), the newest checkpoint directory in `checkpoint_dir`."""

    def __init__(self, shard: InMemoryShard, device: torch.device | None = None,
                 val_shard: InMemoryValShard | None = None) -> None:
        self._shard = shard
        self._val = val_shard
        self.device = device or torch.device("cpu")
        self.reports: list[dict[str, Any]] = []
        self.report_times: list[float] = []
        self.checkpoint_dir: str | None = None

    def checkpoint(self) -> None:
        return None

    def train_shard(self) -> InMemoryShard:
        return self._shard

    def val_shard(self) -> InMemoryValShard | None:
        return self._val  # None: run_loop validates on the job's val files, decoded in this process

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        self.report_times.append(time.perf_counter())
        if checkpoint_dir:
            self.checkpoint_dir = checkpoint_dir
