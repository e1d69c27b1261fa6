"""NextEpoch: an epoch's batches started in a background thread, delivered in order, errors re-raised."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from pipeline.training.loop import NextEpoch


def test_next_epoch_yields_every_batch_in_order_and_starts_early() -> None:
    started = threading.Event()

    def batches() -> Iterator[int]:
        started.set()  # runs in the background thread, before anyone iterates
        yield from range(5)

    pending = NextEpoch(batches)
    assert started.wait(5), "the first batch was not requested in the background"
    assert list(pending) == [0, 1, 2, 3, 4]


def test_next_epoch_empty_and_errors() -> None:
    assert list(NextEpoch(lambda: iter(()))) == []

    def broken() -> Iterator[int]:
        raise OSError("shard unreadable: data/shards/train/train-00003.parquet")
        yield 0  # pragma: no cover

    with pytest.raises(OSError, match="train-00003"):
        list(NextEpoch(broken))

    def late_failure() -> Iterator[int]:
        yield 1
        raise ValueError("checksum mismatch")

    got = []
    with pytest.raises(ValueError, match="checksum"):
        for b in NextEpoch(late_failure):
            got.append(b)
    assert got == [1]
