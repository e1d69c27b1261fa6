"""The benchmark record, the evidence that goes with it, and reports/bench.json.

A record is `{"name", "value", "unit", "baseline_name", "baseline_value", "ratio", "machine", "n_runs",
"spread"}` followed by optional extra keys (notes, settings, secondary numbers). Conventions used by every
benchmark here:

- `value` / `baseline_value`: medians over `n_runs` repetitions, ours and the baseline measured side by side in
  one process, alternating (ours first on even repetitions) so drift on a shared machine hits both alike.
- `ratio` = value / baseline_value: ours over the baseline, higher is better.
- `spread` = [min, max] of the per-repetition ratios (ours_i / baseline_i), the number a reader needs to judge
  whether the ratio's distance from 1 is more than noise.
- `machine`: platform, CPU model, cores, library versions and the 1-minute load average (before the benchmark
  and when the record was made): on a shared 2-core machine other people's jobs move the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RECORD_KEYS = (
    "name",
    "value",
    "unit",
    "baseline_name",
    "baseline_value",
    "ratio",
    "machine",
    "n_runs",
    "spread",
)
DEFAULT_REPORT = "reports/bench.json"
_VERSIONED = ("torch", "torchvision", "ray", "pyarrow", "pillow")


def load1() -> float:
    """The 1-minute load average (the number of runnable processes, to compare with the core count)."""
    return os.getloadavg()[0]


def median_spread(values: Iterable[float]) -> tuple[float, list[float]]:
    """(median, [min, max]) of the values."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("median_spread of no values")
    return statistics.median(vals), [min(vals), max(vals)]


def paired_ratios(ours: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """Per-repetition ratios ours_i / baseline_i (repetition i measured the two back to back)."""
    return [a / b for a, b in zip(ours, baseline, strict=True)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def machine(load_before: float | None = None) -> str:
    """One line of evidence: where and with what the numbers were measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    load = f"1-min load {load1():.2f}"
    if load_before is not None:
        load = f"1-min load {load_before:.2f} before / {load1():.2f} after"
    versions = ", ".join(f"{d} {_version(d)}" for d in _VERSIONED)
    return (
        f"{platform.platform()}; {cpu_model()}; {os.cpu_count()} CPUs ({usable} usable); {load}; "
        f"Python {platform.python_version()}, {versions}"
    )


def _round(x: float) -> float:
    """4 significant digits: more would claim a precision that a shared machine does not give."""
    return float(f"{x:.4g}")


def record(
    name: str,
    value: float,
    unit: str,
    baseline_name: str,
    baseline_value: float,
    n_runs: int,
    spread: Sequence[float],
    *,
    load_before: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One benchmark record; `spread` is [min, max] of the per-repetition ratios. `extra` keys follow the
    nine fixed ones (they may not replace them)."""
    if baseline_value <= 0:
        raise ValueError(f"{name}: baseline_value must be > 0, got {baseline_value}")
    if len(spread) != 2:
        raise ValueError(f"{name}: spread must be [min, max], got {spread!r}")
    clash = set(extra) & set(RECORD_KEYS)
    if clash:
        raise ValueError(f"{name}: extra keys {sorted(clash)} would replace fixed record keys")
    rec: dict[str, Any] = {
        "name": name,
        "value": _round(value),
        "unit": unit,
        "baseline_name": baseline_name,
        "baseline_value": _round(baseline_value),
        "ratio": round(value / baseline_value, 3),
        "machine": machine(load_before),
        "n_runs": int(n_runs),
        "spread": [round(float(spread[0]), 3), round(float(spread[1]), 3)],
    }
    rec.update(extra)
    return rec


def write_report(records: Sequence[dict[str, Any]], path: str | os.PathLike[str] = DEFAULT_REPORT) -> list[dict]:
    """Merge `records` into the JSON list at `path` by name (a new record replaces the old one of its name,
    the others stay: a partial run keeps the rest), write atomically, return the merged list."""
    path = Path(path)
    merged: dict[str, dict[str, Any]] = {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(old, list):
            merged = {r["name"]: r for r in old if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError):
        pass  # no report yet, or an unreadable one: it is replaced
    for rec in records:
        merged[rec["name"]] = rec
    out = list(merged.values())
    from pipeline.runtime import write_json

    write_json(path, out)
    return out


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the records: name, ours, baseline, ratio [spread], n."""
    header = ("name", "value", "baseline", "ratio [min, max]", "n_runs")
    rows = [
        (
            r["name"],
            f"{r['value']:g} {r['unit']}",
            f"{r['baseline_value']:g} ({r['baseline_name']})",
            f"{r['ratio']:.3f} [{r['spread'][0]:.3f}, {r['spread'][1]:.3f}]",
            str(r["n_runs"]),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
