"""Failures that a retry cannot fix, and how to find one behind Ray's wrappers.

`train.max_failures` restarts the worker group from its last checkpoint; the checkpoint restores the weights, the
optimizer and every rank's RNG streams exactly, on the same data. A failure that came from those (a diverging
loss, a shard that differs from its manifest, a bad option) therefore comes back on every retry: retrying only
spends the restarts and hides the cause under N Ray tracebacks. Those failures end the run at once (see
`deterministic_cause` and trainer.StopOnDeterministicFailure); a lost node or a killed worker is still retried.

Kept free of heavy imports: the training workers and Ray Train's controller process import it.
"""

from __future__ import annotations


class DeterministicFailure(Exception):
    """A failure that recurs identically when the run is retried from its checkpoint."""


class TrainingDiverged(DeterministicFailure, FloatingPointError):
    """Non-finite training loss: the divergence watch stopped the run (also a FloatingPointError, what callers
    that keep a diverged run as a result catch)."""


def _transient_types() -> tuple[type[BaseException], ...]:
    from pipeline.data.shards import ManifestUnreadable, ShardUnreadable

    return (ManifestUnreadable, ShardUnreadable)


def deterministic_types() -> tuple[type[BaseException], ...]:
    """The exception types a retry cannot fix: ours, refused data (a shard or manifest that differs from what
    prepare wrote stays so), refused params and missing pretrained weights."""
    from pipeline.config import ParamsError
    from pipeline.data.sources import DataError
    from pipeline.models.pretrained import PretrainedNotFound

    return (DeterministicFailure, DataError, ParamsError, PretrainedNotFound)


def _nested(e: BaseException) -> list[BaseException]:
    """What `e` wraps, in the order to look: Ray Train's controller failure and per-rank worker failures (by
    rank), a Ray task error's `cause`, Train's UserExceptionWithTraceback `_base_exc`, then the exception chain."""
    found: list[object] = [getattr(e, "controller_failure", None)]
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict):
        try:
            ranks = sorted(failures)
        except TypeError:  # not all ranks comparable: keep Ray's order
            ranks = list(failures)
        found += [failures[k] for k in ranks]
    found += [getattr(e, "cause", None), getattr(e, "_base_exc", None), e.__cause__, e.__context__]
    return [n for n in found if isinstance(n, BaseException) and n is not e]


def _is_wrapper(e: BaseException) -> bool:
    """A Ray wrapper that only carries another exception. A RayTaskError raised on the driver is a dual class
    that is also an instance of its cause's type (`as_instanceof_cause`) but whose message is the remote
    traceback: the cause itself is the one to report."""
    return any(isinstance(getattr(e, attr, None), BaseException)
               for attr in ("cause", "_base_exc", "controller_failure"))


def deterministic_cause(exc: BaseException | None) -> BaseException | None:
    """The first failure behind `exc` that a retry cannot fix (depth first through `_nested`), or None: None
    for a killed worker, a lost node, an I/O error or anything not known to be deterministic."""
    if exc is None:
        return None
    wanted, transient = deterministic_types(), _transient_types()
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, wanted) and not isinstance(e, transient) and not _is_wrapper(e):
            return e
        todo += reversed(_nested(e))  # depth first, in _nested's order
    return None
