"""Ray Tune: resources derived from the cluster; a real 2-CPU Ray with more trials than fit finishes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.tuning import DATA_CPU_RESERVE, trial_resources

ROOT = Path(__file__).resolve().parent.parent


def test_trial_resources_fit_small_and_large_machines() -> None:
    # 2 cores (+2 logical for data), in-process trials: two trials of one CPU each, data keeps the rest.
    assert trial_resources(4, 1.0, 0, None) == (2, 1.0, 1.0)
    # A 2-CPU Ray with worker-group trials: one trial at a time, the worker's share shrinks to fit.
    concurrent, per_worker, request = trial_resources(2, 1.0, 1, None)
    assert concurrent == 1 and per_worker == pytest.approx(2 - DATA_CPU_RESERVE) and request < 0.05
    # A 64-CPU cluster with 8-CPU workers: many trials side by side; a user cap wins.
    assert trial_resources(64, 8, 1, None)[0] == 7
    assert trial_resources(64, 8, 1, 3)[0] == 3


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_tune_on_two_cpus_with_more_trials_than_fit_finishes(synthetic_shards, tmp_path, monkeypatch) -> None:
    import ray

    from pipeline import tracking
    from pipeline.tuning import run_tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", f"train.storage_path={tmp_path / 'ray'}", "train.batch_size=16",
        "tune.num_samples=3", "tune.epochs=1", "tune.lr_warmup_epochs=[0]", "tune.workers_per_trial=0",
        "tune.time_budget_s=400",
        "tune.train_fraction=1.0",
    ])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        best = run_tune(p, tmp_path / "tune")  # shuts Ray down itself
    finally:
        ray.shutdown()
    assert p.tune.lr_low <= best["lr"] <= p.tune.lr_high
    assert best["lr_warmup_epochs"] in p.tune.lr_warmup_epochs
    assert best["trials"] == 3 and best["not_run"] == 0
    rows = list(csv.DictReader((tmp_path / "tune/trials.csv").open()))
    assert len(rows) == 3 and all(int(r["epochs_run"]) >= 1 for r in rows)
    assert json.loads((tmp_path / "tune/best.json").read_text()) == best
    parents = tracking.experiment_runs(
        p.tracking.experiment, "tags.`dvc.stage` = 'tune' and attributes.run_name = 'tune-resnet18'"
    )
    assert len(parents) == 1
    assert len(tracking.child_runs(parents[0].info.run_id, p.tracking.experiment)) == 3
