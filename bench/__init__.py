"""Benchmarks: each measures ours against a baseline side by side in one process (`python -m bench`).

Every module exposes `run(tmpdir) -> list[dict]` returning benchmark records (built by `bench.common.record`);
`python -m bench` runs them in sequence and merges the records into reports/bench.json.
"""
