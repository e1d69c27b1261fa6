"""Failures that a retry cannot fix end the run at once; worker and node losses are still retried.

The unit tests build the wrappers a worker's exception travels in to the driver (Ray Train V2's
UserExceptionWithTraceback, WorkerGroupError, ControllerError, a Ray task error, exception chains, each
pickled as Ray does); the Ray test counts the attempts of a run that diverges with train.max_failures=3.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path
from typing import Any

import pytest

from pipeline.data.shards import ManifestError, ShardChecksumError
from pipeline.data.sources import DataError
from pipeline.training.errors import DeterministicFailure, TrainingDiverged, deterministic_cause

ROOT = Path(__file__).resolve().parent.parent


def _raised(exc: BaseException, cause: BaseException | None = None, *, context: bool = False) -> BaseException:
    """`exc` as Python leaves it when raised `from cause` (or, context=True, while handling `cause`)."""
    try:
        if context:
            try:
                raise cause  # type: ignore[misc]
            except BaseException:
                raise exc  # noqa: B904 - the implicit __context__ is what is tested
        raise exc from cause
    except BaseException as e:  # noqa: BLE001
        return e


def _roundtrip(exc: BaseException) -> BaseException:
    return pickle.loads(pickle.dumps(exc))


def _diverged() -> TrainingDiverged:
    return TrainingDiverged("non-finite training loss at epoch 0 step 3 (arch resnet18, lr 1e+12; 2 in a row)")


def _worker_died() -> BaseException:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def test_plain_deterministic_errors_are_their_own_cause() -> None:
    d = _diverged()
    assert deterministic_cause(d) is d
    assert isinstance(d, DeterministicFailure) and isinstance(d, FloatingPointError)  # degradation catches it
    bad = ShardChecksumError("shard /s/train/00000.parquet has sha256 abc..., the manifest says def...")
    assert deterministic_cause(bad) is bad
    m = ManifestError("no shard manifest at /s/manifest.json")
    assert deterministic_cause(m) is m


def test_losses_and_io_errors_are_not_deterministic() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    from pipeline.data.shards import ShardUnreadable

    assert deterministic_cause(None) is None
    assert deterministic_cause(RuntimeError("gloo: connection reset by peer")) is None
    assert deterministic_cause(OSError("AWS Error NETWORK_CONNECTION")) is None
    assert deterministic_cause(ShardUnreadable("shard s3://b/x.parquet cannot be read: timeout")) is None
    assert deterministic_cause(_worker_died()) is None
    killed = WorkerGroupError("rank 1 died", {0: RuntimeError("collective aborted"), 1: _worker_died()})
    assert deterministic_cause(_roundtrip(killed)) is None


def test_found_inside_train_v2_wrappers_after_pickling() -> None:
    """What the controller and the driver receive: the worker's exception inside UserExceptionWithTraceback,
    a WorkerGroupError's worker_failures (by rank), a ControllerError's controller_failure."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    wrapped = _roundtrip(UserExceptionWithTraceback(_diverged(), "Traceback (most recent call last): ..."))
    assert isinstance(deterministic_cause(wrapped), TrainingDiverged)

    group = WorkerGroupError("2 workers failed", {1: _diverged(), 0: RuntimeError("gloo: peer closed")})
    found = deterministic_cause(_roundtrip(group))
    assert isinstance(found, TrainingDiverged) and "epoch 0 step 3" in str(found)

    ctrl = _roundtrip(ControllerError(_diverged()))
    assert isinstance(deterministic_cause(ctrl), TrainingDiverged)
    # A deterministic failure wins over the collateral errors of the other ranks, whichever rank it is on.
    group = WorkerGroupError("x", {0: _worker_died(), 1: RuntimeError("y"), 2: ShardChecksumError("shard z")})
    assert isinstance(deterministic_cause(group), ShardChecksumError)


def test_found_behind_ray_task_errors_and_exception_chains() -> None:
    """A Ray Data read task's refused shard reaches the worker as a RayTaskError dual class (an instance of the
    cause's type whose message is the remote traceback): the cause is reported, not the dual."""
    from ray.exceptions import RayTaskError

    refused = ShardChecksumError("shard /s/val/00000.parquet has 10 bytes, the manifest says 12")
    dual = RayTaskError("ReadParquet", "Traceback (most recent call last):\n  ...", refused).as_instanceof_cause()
    assert isinstance(dual, DataError)  # why the dual itself must not be returned
    found = deterministic_cause(_raised(RuntimeError("iter_batches failed"), dual))
    assert found is not dual and type(found) is ShardChecksumError and "10 bytes" in str(found)

    assert isinstance(deterministic_cause(_raised(KeyError("x"), _diverged(), context=True)), TrainingDiverged)
    deep = _raised(RuntimeError("a"), _raised(ValueError("b"), _raised(OSError("c"), _diverged())))
    assert isinstance(deterministic_cause(deep), TrainingDiverged)


def test_cycles_end() -> None:
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert deterministic_cause(a) is None


def test_callback_raises_the_deterministic_failure_and_lets_losses_through() -> None:
    """What Ray Train's controller calls after a poll that saw worker errors (retry.py says what follows)."""
    from pipeline.training.retry import StopOnDeterministicFailure

    cb = _roundtrip(StopOnDeterministicFailure())  # it travels to the controller pickled
    cb.after_exception(None, {0: _worker_died(), 1: RuntimeError("collective aborted")})  # retried: no raise
    with pytest.raises(TrainingDiverged, match="epoch 0 step 3"):
        cb.after_exception(None, {0: RuntimeError("collective aborted"), 1: _diverged()})


def test_fit_raises_the_cause_in_one_line_with_arch_and_lr() -> None:
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    from pipeline.training.trainer import fit

    class Raises:
        train_loop_config = {"arch": "resnet50", "lr": 0.4}

        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def fit(self) -> Any:
            raise self.exc

    with pytest.raises(TrainingDiverged) as info:
        fit(Raises(_roundtrip(ControllerError(_diverged()))))
    assert str(info.value) == str(_diverged()) and info.value.__suppress_context__
    multi = ShardChecksumError("shard /s/train/00003.parquet has sha256 abc\nTraceback (most recent call last):")
    with pytest.raises(ShardChecksumError) as info:
        fit(Raises(WorkerGroupError("x", {0: multi})))
    assert str(info.value) == ("training resnet50 at lr 0.4 stopped, not retried: "
                               "shard /s/train/00003.parquet has sha256 abc")
    lost = WorkerGroupError("x", {0: _worker_died()})
    with pytest.raises(WorkerGroupError):
        fit(Raises(lost))


# --- real Ray Train: attempts counted -----------------------------------------------------------------------


def _counted_train_fn(log: str, config: dict[str, Any]) -> None:
    """The real worker function, after appending one line per attempt to `log` (O_APPEND: whole lines)."""
    import os

    from pipeline.training.loop import train_loop_per_worker

    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"attempt pid {os.getpid()}\n")
    train_loop_per_worker(config)


def _params(shards: Path, storage: Path, **train: object) -> Any:
    from pipeline.config import load_params

    sets = [f"data.shards_dir={shards}", f"train.storage_path={storage}", "train.epochs=2", "train.batch_size=16",
            "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.amp=none", "train.momentum=0.0"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_params(ROOT / "params.yaml", sets)


def _attempts_of(p: Any, lr: float, tmp_path: Path) -> tuple[int, BaseException]:
    """Run a 1-worker Ray Train job of `p` at `lr` that must fail; (worker function runs, what run() raised)."""
    import ray

    from pipeline.runtime import init_ray
    from pipeline.training.trainer import build_trainer, make_job, run

    init_ray()
    try:
        job = make_job(p, "resnet18", lr, 0, p.train.epochs, None)
        trainer = build_trainer(job, p, name="fails", num_workers=1, storage_path=str(tmp_path / "ckpt"))
        log = tmp_path / "attempts.log"
        trainer.train_loop_per_worker = functools.partial(_counted_train_fn, str(log))
        with pytest.raises(Exception) as info:  # noqa: B017 - the callers assert the type, after the count
            run(trainer)
    finally:
        ray.shutdown()
    attempts = len(log.read_text().splitlines()) if log.exists() else 0
    print(f"attempts: {attempts}; raised {type(info.value).__name__}: {str(info.value)[:300]}")
    return attempts, info.value


@pytest.mark.ray
def test_diverging_run_is_not_retried(synthetic_shards, tmp_path) -> None:
    """lr 1e12 diverges in the first epoch, and would again after every restart (same weights, same RNG
    streams from the checkpoint): with train.max_failures=3 the worker function runs once, not four times,
    and the driver gets TrainingDiverged with arch, lr and epoch in one line."""
    p = _params(synthetic_shards, tmp_path / "ckpt", num_workers=1, cpus_per_worker=1, max_failures=3)
    attempts, raised = _attempts_of(p, 1e12, tmp_path)
    assert attempts == 1, f"{attempts} attempts of a run that diverges every time"
    assert isinstance(raised, TrainingDiverged), repr(raised)[:2000]
    msg = str(raised)
    assert "\n" not in msg and "non-finite training loss at epoch 0" in msg
    assert "arch resnet18, lr " in msg


@pytest.mark.ray
def test_a_corrupted_shard_is_not_retried(synthetic_shards, tmp_path) -> None:
    """A shard whose bytes differ from the manifest (same size, intact footer: start-up passes) fails the Ray
    Data read task inside the worker; that error reaches the controller inside Ray Data's wrappers and is still
    recognised: one attempt, ShardChecksumError naming the shard."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards, shards)
    bad = shards / "train" / "00002.parquet"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = _params(shards, tmp_path / "ckpt", num_workers=1, cpus_per_worker=1, max_failures=3)
    attempts, raised = _attempts_of(p, 0.05, tmp_path)
    assert attempts == 1, f"{attempts} attempts of a run that reads a corrupted shard every time"
    assert isinstance(raised, ShardChecksumError), repr(raised)[:2000]
    assert f"shard {bad.resolve()} has sha256" in str(raised) and "\n" not in str(raised)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_diverging_worker_group_trial_fails_once(minival_shards, tmp_path, monkeypatch) -> None:
    """tune.workers_per_trial >= 1 drives the same TorchTrainer: a trial whose lr diverges fails once with
    TrainingDiverged (Tune keeps max_failures=0 for trials), its worker group not restarted train.max_failures
    times. Attempts are counted by the train shards' verified reads (every process records them): each attempt's
    first epoch reads every train shard once."""
    from collections import Counter

    import ray

    from pipeline.config import load_params
    from pipeline.data.shards import shard_files
    from pipeline.tuning import run_tune
    from tests.test_tuning import _reads, _start_ray

    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={minival_shards}", f"train.storage_path={tmp_path / 'ray'}", "model.archs=[resnet18]",
        "tune.archs=[resnet18]", "train.batch_size=16", "train.cpus_per_worker=0.5", "train.max_failures=2",
        "train.amp=none", "train.momentum=0.0", "tune.num_samples=1", "tune.epochs=1", "tune.grace_period=1",
        "tune.lr_per_256_low=1e13", "tune.lr_per_256_high=2e13", "tune.lr_warmup_epochs=[0]",
        "tune.workers_per_trial=1", "tune.time_budget_s=600",
    ])
    log = _start_ray(monkeypatch, tmp_path, num_cpus=4)
    try:
        with pytest.raises(RuntimeError, match="no tune trial of resnet18 reported a result"):
            run_tune(p, tmp_path / "tune")
    finally:
        ray.shutdown()
    train = set(shard_files(minival_shards, "train", verify=False))
    per_shard = Counter(loc for kind, loc in _reads(log) if kind == "bytes" and loc in train)
    errors = [f.read_text(errors="replace") for f in (tmp_path / "ray").rglob("error.txt")]
    print(f"train shard reads per shard: {sorted(per_shard.values())}; trial errors: {len(errors)}")
    assert per_shard and max(per_shard.values()) == 1, f"the trial's worker group ran more than once: {per_shard}"
    assert len(errors) == 1 and "TrainingDiverged" in errors[0], errors
