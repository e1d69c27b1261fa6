"""Ray Data ingest (pipeline.data.ingest) on real Ray: every row once per epoch, disjoint rows per worker, the
file order reshuffled every epoch, read and decode fused into one operator, the val transform applied."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import read_manifest, read_shard, shard_files

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_2cpus():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _keys_of_pass(ds) -> list[str]:
    return [k for b in ds.iter_batches(batch_format="numpy", batch_size=None) for k in b["key"].tolist()]


def test_train_pass_has_every_row_once_and_files_reshuffle_each_epoch(ray_2cpus, synthetic_shards: Path) -> None:
    from pipeline.data.ingest import train_dataset

    files = shard_files(synthetic_shards, "train")
    assert len(files) == 4  # 64 rows, 16 per shard
    ds = train_dataset(files, crop=24, min_scale=0.35, seed=0, keep_keys=True)
    # Blocks in the order of the files, not of the tasks that finish first: the shard order each pass read is
    # then the ingest's shuffle, which the scheduler cannot reorder into a pass (or a failure) by chance.
    ds.context.execution_options.preserve_order = True
    epochs = [_keys_of_pass(ds) for _ in range(3)]
    n_train = read_manifest(synthetic_shards)["splits"]["train"]["n_images"]
    for keys in epochs:
        assert len(keys) == n_train and len(set(keys)) == n_train
    # File-level shuffle, seeded and reseeded after every execution: each pass reads the 4 shards one after the
    # other, in an order of its own (seed 0: 3 passes, not all the same order; without the reseed all 3 match).
    shard_of = {k: i for i, f in enumerate(files) for k in read_shard(f, columns=["key"]).column("key").to_pylist()}
    orders = [tuple(dict.fromkeys(shard_of[k] for k in keys)) for keys in epochs]
    for keys, order in zip(epochs, orders, strict=True):
        assert sorted(order) == [0, 1, 2, 3] and [shard_of[k] for k in keys[::16]] == list(order), order
    assert len(set(orders)) > 1, orders
    batch = next(iter(ds.iter_batches(batch_format="numpy", batch_size=8)))
    assert batch["image"].shape == (8, 3, 24, 24) and batch["image"].dtype == np.uint8
    # Read and decode run as ONE fused operator (a task per shard file), not two operators.
    assert "ReadParquet->MapBatches(TrainDecode)" in ds.stats()
    # ... which gets the whole CPU budget from the start (no per-operator reservation), and only this dataset.
    from ray.data import DataContext

    assert ds.context.op_resource_reservation_enabled is False
    assert DataContext.get_current().op_resource_reservation_enabled is True


def test_two_workers_see_disjoint_rows_each_epoch(ray_2cpus, synthetic_shards: Path) -> None:
    from pipeline.data.ingest import train_dataset

    ds = train_dataset(shard_files(synthetic_shards, "train"), crop=24, min_scale=0.35, seed=0, keep_keys=True)
    for _epoch in range(2):  # a fresh split per epoch, as Train V2 does
        splits = ds.streaming_split(2, equal=True)  # what Ray Train gives its 2 workers
        seen: list[list[str]] = [[], []]

        def consume(split, out: list[str]) -> None:
            for b in split.iter_batches(batch_format="numpy", batch_size=None):
                out.extend(b["key"].tolist())

        threads = [threading.Thread(target=consume, args=(splits[i], seen[i])) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(seen[0]) == len(seen[1]) == 32
        assert not set(seen[0]) & set(seen[1])


def test_val_pass_is_exact_and_matches_the_val_transform(ray_2cpus, synthetic_shards: Path) -> None:
    import pyarrow.parquet as pq

    from pipeline.data.ingest import val_dataset
    from pipeline.data.transforms import val_image

    files = shard_files(synthetic_shards, "val")
    rows = {}
    for f in files:
        t = pq.read_table(f, columns=["key", "image", "label"]).to_pylist()
        rows.update({r["key"]: r for r in t})
    got = Counter()
    for b in val_dataset(files, resize=36, crop=32).iter_batches(batch_format="numpy", batch_size=None):
        for key, img, label in zip(b["key"].tolist(), b["image"], b["label"], strict=True):
            got[key] += 1
            assert label == rows[key]["label"]
            assert np.array_equal(img, val_image(rows[key]["image"], 36, 32))
    assert set(got) == set(rows) and set(got.values()) == {1}


def test_a_corrupted_shard_fails_the_read_task_that_reads_it_naming_it(
    ray_2cpus, synthetic_shards: Path, tmp_path: Path
) -> None:
    """Start-up checks sizes and footers only; the read task hashes the bytes it fetched (pipeline.data.shards)."""
    import shutil

    from pipeline.data.ingest import train_dataset
    from pipeline.data.shards import ShardChecksumError

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    bad = shards / "train" / "00002.parquet"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF  # an image byte: same size, intact footer
    bad.write_bytes(bytes(data))
    files = shard_files(shards, "train")  # passes: nothing cheap is wrong
    with pytest.raises(ShardChecksumError, match=rf"shard {bad.resolve()} has sha256"):
        _keys_of_pass(train_dataset(files, crop=24, min_scale=0.35, seed=0, keep_keys=True))
    # The other shards alone read fine: a run that reads only them checks only them.
    good = [f for f in files if not f.endswith("00002.parquet")]
    assert len(_keys_of_pass(train_dataset(good, crop=24, min_scale=0.35, seed=0, keep_keys=True))) == 48
