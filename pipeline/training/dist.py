"""The only module that knows about ranks: world info and exact sums across workers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as torch_dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a distributed group (num_workers=0, plain scripts)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    return world()[0] == 0


def sum_across(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Sum numbers over every rank (float64 so image counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if world()[1] > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t.tolist()


def any_across(flag: bool, device: torch.device | None = None) -> bool:
    """True when `flag` is True on any rank: every rank takes the same branch, so none hangs in a
    collective that the others skipped."""
    return sum_across([1.0 if flag else 0.0], device)[0] > 0


def shard_for_rank(items: Sequence[str], rank: int, world_size: int) -> list[str]:
    """Round-robin assignment of files to ranks: disjoint, and their union is every item."""
    return list(items[rank::world_size])
