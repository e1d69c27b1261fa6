"""Opt-in instrumentation of what a GPU punishes: host synchronisations and collectives, per loop phase.

`PIPELINE_SYNC_PROBE=DIR` (read by the worker function) patches, in that worker process only:
- the tensor methods that read a value back to Python (`item`, `tolist`, `numpy`, `__bool__`, `__int__`,
  `__float__`, `__index__`): on CUDA each one waits for the GPU queue to drain;
- torch.distributed's Python collectives: each call is recorded with the device of every tensor it was given
  (NCCL accepts only CUDA tensors, so a CPU tensor there is a crash on a GPU cluster).

The loop marks its phases (`phase("step")` around the train step, `phase("epoch_end")` ...); at the end of the
run each rank writes DIR/rank<R>.json with counts per phase and the collectives' devices. DDP's gradient
all-reduce runs in C++ and is not seen here, which is the point: everything we add beyond it is.
Off (the default) this module is never imported by the loop's hot path: `phase` is a no-op.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "PIPELINE_SYNC_PROBE"

_SYNC_METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "gather", "scatter", "barrier", "all_to_all", "all_gather_object",
                "broadcast_object_list", "gather_object")


class Probe:
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.current = "setup"
        self.syncs: Counter[str] = Counter()  # "phase:method" -> count
        self.collectives: list[dict[str, Any]] = []
        self.steps = 0
        # Only the training thread's calls count: Ray Data's prefetch threads and our NextEpoch thread convert
        # and move batches concurrently, which is the overlap we want, not a stall of the step.
        self.thread = threading.get_ident()
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        import torch
        import torch.distributed as torch_dist

        probe = self

        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(t: Any, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
                if threading.get_ident() == probe.thread:
                    probe.syncs[f"{probe.current}:{_n}"] += 1
                return _o(t, *a, **k)

            self._originals.append((torch.Tensor, name, original))
            setattr(torch.Tensor, name, counted)

        for name in _COLLECTIVES:
            original = getattr(torch_dist, name, None)
            if original is None:
                continue

            def recorded(*a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
                devices = sorted({str(x.device) for x in _tensors(a, k)})
                where = probe.current if threading.get_ident() == probe.thread else "other-thread"
                probe.collectives.append({"phase": where, "op": _n, "devices": devices})
                return _o(*a, **k)

            self._originals.append((torch_dist, name, original))
            setattr(torch_dist, name, recorded)

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._originals):
            setattr(owner, name, original)
        self._originals.clear()

    def write(self, rank: int) -> None:
        from pipeline.runtime import write_json

        blob = {"rank": rank, "steps": self.steps, "syncs": dict(self.syncs), "collectives": self.collectives}
        write_json(self.out_dir / f"rank{rank}.json", blob)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    import torch

    found = []
    for v in [*args, *kwargs.values()]:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, list | tuple):
            found += [x for x in v if isinstance(x, torch.Tensor)]
    return found


_ACTIVE: Probe | None = None


def start_from_env() -> Probe | None:
    """Install the probe when PIPELINE_SYNC_PROBE is set (once per process)."""
    global _ACTIVE
    out = os.environ.get(ENV)
    if not out or _ACTIVE is not None:
        return _ACTIVE
    _ACTIVE = Probe(out)
    _ACTIVE.install()
    return _ACTIVE


def phase(name: str) -> None:
    """Mark the loop's current phase (no-op without a probe)."""
    if _ACTIVE is not None:
        _ACTIVE.current = name
        if name == "step":
            _ACTIVE.steps += 1


def finish(rank: int) -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.current = "done"
        _ACTIVE.write(rank)
        _ACTIVE.uninstall()
        _ACTIVE = None
