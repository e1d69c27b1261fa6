"""Stages size themselves from what they REQUEST, not from what happens to be up.

On an autoscaling cluster (the launcher config's `min_workers: 0`, KubeRay's `minReplicas: 0`) the GPU nodes
exist only once something asks for them: `ray.cluster_resources()` read at start-up sees a head with no GPU
and a few CPUs. So each stage states the resource shapes it needs, asks the autoscaler for them
(`ray.autoscaler.sdk.request_resources`) and waits until the cluster can place them, with a bounded timeout and
a message naming what is missing. A cluster that can never grow (the local Ray this process started) and does
not fit fails at once, naming the params to change.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence

Bundle = dict[str, float]


class ResourcesUnavailable(RuntimeError):
    """The cluster cannot place a stage's request (now, or within `cluster.wait_for_resources_s`)."""


def cluster_can_grow() -> bool:
    """Whether more nodes may join: true when we joined a cluster (RAY_ADDRESS); false for the local Ray that
    `pipeline.training.trainer.init_ray` started in this process (its size is fixed)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def place(bundles: Sequence[Bundle], nodes: Sequence[Bundle]) -> list[int] | None:
    """First-fit-decreasing placement of `bundles` onto nodes' free resources: the node index of each bundle,
    or None when they do not all fit at once. Pure (the tests drive it with made-up nodes)."""
    free = [dict(n) for n in nodes]
    order = sorted(range(len(bundles)), key=lambda i: (-bundles[i].get("GPU", 0), -bundles[i].get("CPU", 0)))
    where = [-1] * len(bundles)
    for i in order:
        need = bundles[i]
        for j, node in enumerate(free):
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                where[i] = j
                break
        else:
            return None
    return where


def describe(bundles: Sequence[Bundle]) -> str:
    """`2 x {CPU: 8, GPU: 1} + 1 x {CPU: 1}`: the request, grouped by shape."""
    shapes: dict[tuple[tuple[str, float], ...], int] = {}
    for b in bundles:
        key = tuple(sorted((k, v) for k, v in b.items() if v))
        shapes[key] = shapes.get(key, 0) + 1
    return " + ".join(f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in key)}}}" for key, n in shapes.items())


def missing(bundles: Sequence[Bundle], nodes: Sequence[Bundle]) -> str:
    """What the cluster lacks for `bundles`, in words: totals short per resource, or the shapes no node fits."""
    short = []
    for key in sorted({k for b in bundles for k in b}):
        need = sum(b.get(key, 0.0) for b in bundles)
        have = sum(n.get(key, 0.0) for n in nodes)
        if have + 1e-9 < need:
            short.append(f"{need - have:g} more {key} (needs {need:g}, has {have:g})")
    if short:
        return "; ".join(short)
    unfit = [b for b in bundles if place([b], nodes) is None]
    if unfit:
        return f"no node can hold {describe(unfit)} (largest node: {describe([_largest(nodes)])})"
    return "the shapes do not pack onto the nodes at once"


def _largest(nodes: Sequence[Bundle]) -> Bundle:
    return max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})


def alive_nodes() -> list[Bundle]:
    """Each alive node's total resources (CPU, GPU, memory, custom), as Ray reports them now."""
    import ray

    return [
        {k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
        for n in ray.nodes() if n.get("Alive")
    ]


def wait_for_resources(
    bundles: Sequence[Bundle], *, what: str, keys: str, timeout_s: float, poll_s: float = 2.0,
    can_grow: bool | None = None, nodes: Callable[[], list[Bundle]] = alive_nodes,
) -> list[Bundle]:
    """Ask the autoscaler for `bundles` and wait until the alive nodes can place all of them at once.

    `what` names the stage's request in messages, `keys` the params that size it. Returns the nodes then
    seen. Raises ResourcesUnavailable at once when the cluster cannot grow, or after `timeout_s`.
    """
    bundles = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    grow = cluster_can_grow() if can_grow is None else can_grow
    seen = nodes()
    if place(bundles, seen) is not None:
        return seen
    if not grow:
        raise ResourcesUnavailable(
            f"{what} needs {describe(bundles)}; this machine's Ray has {describe(seen)} and cannot grow: "
            f"{missing(bundles, seen)}. Lower {keys}, or run on a cluster (RAY_ADDRESS)."
        )
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    print(f"[cluster] {what}: waiting up to {timeout_s:g} s for {describe(bundles)} "
          f"(now: {missing(bundles, seen)}); asked the autoscaler for them", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    while True:
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        seen = nodes()
        if place(bundles, seen) is not None:
            print(f"[cluster] {what}: resources are up ({len(seen)} node(s))", file=sys.stderr, flush=True)
            return seen
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(
                f"{what} needs {describe(bundles)}; after waiting {timeout_s:g} s the cluster has "
                f"{len(seen)} node(s) and still lacks {missing(bundles, seen)}. Check the autoscaler's node types "
                f"and max_workers (`ray status`), raise cluster.wait_for_resources_s, or lower {keys}."
            )
        if time.monotonic() - last_note >= 60:
            print(f"[cluster] {what}: still waiting ({math.ceil(deadline - time.monotonic())} s left): "
                  f"{missing(bundles, seen)}", file=sys.stderr, flush=True)
            last_note = time.monotonic()


def release_request() -> None:
    """Withdraw this driver's standing autoscaler request (the stage's own tasks and actors keep theirs)."""
    if not cluster_can_grow():
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])
