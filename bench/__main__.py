"""`python -m bench [--only NAME ...] [--quick] [--out PATH]`: run the benchmarks in sequence, print a table,
merge the records into reports/bench.json (by name: records of benchmarks not run this time are kept).

Each benchmark gets a fresh temp dir and writes its records as soon as it finishes, so a failure later on keeps
the earlier ones. `--quick` (a smoke run: fewer images, repetitions and fits) marks its records `"quick": true`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_REPORT, format_table, load1, machine, write_report

BENCHMARKS = {
    "prepare": "bench.bench_prepare",
    "ingest": "bench.bench_ingest",
    "jpeg": "bench.bench_jpeg",
    "train": "bench.bench_train",
    "deterministic": "bench.bench_determinism",
    "rank_agreement": "bench.rank_agreement",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run the benchmarks side by side; merge the records into a JSON report."
    )
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)}); default: all, in that order")
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller and fewer repetitions")
    parser.add_argument("--out", default=DEFAULT_REPORT, help=f"report to merge into (default {DEFAULT_REPORT})")
    args = parser.parse_args(argv)
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]

    print(f"[bench] {machine()}", flush=True)
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    for name in selected:
        module = importlib.import_module(BENCHMARKS[name])
        kwargs = {"quick": True} if args.quick and "quick" in inspect.signature(module.run).parameters else {}
        print(f"[bench] {name}: starting (1-min load {load1():.2f})", flush=True)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"bench_{name}-") as tmp:
                got = module.run(Path(tmp), **kwargs)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            print(f"[bench] {name}: FAILED after {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        if args.quick:
            for rec in got:
                rec["quick"] = True
        write_report(got, args.out)
        records += got
        print(f"[bench] {name}: {len(got)} record(s) in {time.perf_counter() - t0:.0f} s", flush=True)

    if records:
        print()
        print(format_table(records))
    print(f"\n[bench] {len(records)} record(s) merged into {args.out} in {time.perf_counter() - t_all:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
