"""The only module that knows about ranks, and the home of every collective the loop issues.

Every collective takes the training device. With GPUs, Ray Train initialises torch.distributed with NCCL alone,
and NCCL rejects CPU tensors ("No backend type associated with device type cpu"); gloo (the CPU tests) accepts
both, so a CPU-only suite would never notice a CPU tensor here. Building each tensor on `device` makes the CPU
path and the GPU path the same code.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as torch_dist

# Off: collectives at world size 1 are skipped (nothing to reduce). On: they run anyway, so a single-GPU
# acceptance run (`make gpu-check`, a one-rank NCCL group) fails on a CPU tensor exactly as 16 GPUs would.
_FORCE = False


def set_force_collectives(on: bool) -> None:
    """Run collectives even at world size 1 (needs an initialised process group)."""
    global _FORCE
    _FORCE = bool(on)


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a distributed group (num_workers=0, plain scripts)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    return world()[0] == 0


def _reducing() -> bool:
    if world()[1] > 1:
        return True
    return _FORCE and torch_dist.is_available() and torch_dist.is_initialized()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) of a tensor that already lives on the training device; returned, not copied."""
    if _reducing():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def sum_across(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum numbers over every rank, exactly (float64: image counts stay exact), in ONE collective.

    `values` may mix Python numbers and 0-d tensors already on `device` (device-side accumulators): they are
    stacked on the device, so the only host synchronisation is reading the result back."""
    parts = [
        v.detach().reshape(()).to(device=device, dtype=torch.float64) if isinstance(v, torch.Tensor)
        else torch.tensor(float(v), dtype=torch.float64, device=device)
        for v in values
    ]
    return sum_tensor(torch.stack(parts)).tolist()


def max_across(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise maximum over every rank (one collective)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if _reducing():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return t.tolist()


def shard_for_rank(items: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Round-robin assignment of files to ranks: disjoint, and their union is every item."""
    return list(items[rank::world_size])


def all_gather_objects(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's `obj` (tensors and plain Python values), in rank order, on every rank: two all-gathers of
    byte tensors on `device` (sizes, then the padded payloads). torch's all_gather_object would pickle too, but
    picks its own device; here NCCL gets the training device like every other collective."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    blob = buf.getvalue()
    if not _reducing():
        return [obj]
    world_size = world()[1]
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    torch_dist.all_gather(sizes, size)
    lengths = [int(s) for s in torch.cat(sizes).tolist()]
    payload = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    payload[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(payload) for _ in range(world_size)]
    torch_dist.all_gather(gathered, payload)
    return [torch.load(io.BytesIO(g[:n].cpu().numpy().tobytes()), weights_only=True)
            for g, n in zip(gathered, lengths, strict=True)]
