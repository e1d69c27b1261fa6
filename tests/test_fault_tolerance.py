"""A killed worker and a killed driver both resume from the last checkpoint (real Ray, real MLflow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _params_file(tmp_path: Path, shards: Path, sections: dict[str, dict[str, object]] | None = None,
                 **train: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["shards_dir"] = str(shards)
    params["train"].update({"storage_path": str(tmp_path / "ckpt"), "epochs": 3, "batch_size": 16,
                            "use_tuned": False, "lr": 0.05, "lr_warmup_epochs": 0, **train})
    for section, values in (sections or {}).items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.ray
def test_killed_worker_resumes_and_mlflow_shows_one_run(synthetic_shards, tmp_path, monkeypatch) -> None:
    """Also with EMA, fp16 + GradScaler and mixup on: the EMA weights, the scaler and every rank's RNG streams
    come back from the checkpoint, so the EMA was updated once per step of the whole run, across the restart (a
    restarted EMA would count fewer)."""
    import ray
    import torch

    from pipeline import tracking
    from pipeline.config import load_params
    from pipeline.training.checkpoint import load_train_state
    from pipeline.training.trainer import train_arch

    marker = tmp_path / "killed.txt"
    # Kill rank 1 in the middle of the third epoch (epoch index 2, after its 2nd step). Not the second: Ray's
    # controller registers a reported checkpoint asynchronously, so a crash seconds after a report may resume
    # from the checkpoint before it (seen in CI) -- what must never happen is starting over.
    monkeypatch.setenv("PIPELINE_KILL_WORKER", f"2,2,1,{marker}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if ray.is_initialized():
        ray.shutdown()  # workers must inherit the environment above
    p = load_params(_params_file(tmp_path, synthetic_shards, num_workers=2, cpus_per_worker=1, max_failures=2,
                                   epochs=4, model_ema_decay=0.9, model_ema_steps=1, amp="fp16",
                                   mixup_alpha=0.2))
    try:
        final = train_arch(p, "resnet18", out_dir=tmp_path / "models/resnet18",
                           metrics_path=tmp_path / "metrics.json", curve_path=tmp_path / "curve.csv", best_path=None)
    finally:
        ray.shutdown()
    assert marker.exists(), "the fault was not injected"
    assert final["epochs"] == 4
    assert len(final["resumed_at_epochs"]) == 1 and final["resumed_at_epochs"][0] >= 1, final  # not started over
    curve = (tmp_path / "curve.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == ["1", "2", "3", "4"]
    runs = tracking.experiment_runs(p.tracking.experiment)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    steps = [s for s, _ in tracking.metric_history(runs[0].info.run_id, "val_top1_err")]
    assert sorted(set(steps)) == [1, 2, 3, 4]

    newest = max((tmp_path / "ckpt").glob("train-*/checkpoint_*/checkpoint.pt"), key=lambda f: f.parent.name)
    state = load_train_state(newest.parent)
    steps_per_epoch = 64 // 16  # synthetic_shards: 64 train images, global batch 16
    assert state["ema"]["updates"] == 4 * steps_per_epoch, "EMA restarted instead of resuming"
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]  # fp16: the scaler's state
    rng = state["rng"]
    assert isinstance(rng, list) and len(rng) == 2 and all(set(r) == {"cpu", "cuda", "mix"} for r in rng)
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"]), "each rank keeps its own stream"
    # The exported model is the EMA's weights, and they moved away from the raw weights.
    blob = torch.load(tmp_path / "models/resnet18/model.pt", weights_only=True)
    key = "layer1.0.conv1.weight"
    assert torch.equal(blob["state_dict"][key], state["ema"]["weights"][key])
    assert not torch.equal(state["ema"]["weights"][key], state["model"][key])


@pytest.mark.ray
def test_killed_driver_resumes_on_rerun_after_a_runtime_edit(synthetic_shards, tmp_path, monkeypatch) -> None:
    """Kill the driver, edit only params that do not change the trajectory (pipeline/training/identity.py),
    rerun: the same Ray run and the same MLflow run continue from the last checkpoint."""
    from pipeline import tracking

    # storage_path as a URI (pyarrow filesystem), as on a cluster with shared storage.
    storage = f"file://{tmp_path / 'ckpt'}"
    params = _params_file(tmp_path, synthetic_shards, num_workers=1, epochs=4, storage_path=storage)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--arch", "resnet18",
           "--out", str(tmp_path / "model"), "--metrics", str(tmp_path / "m.json"), "--curve", str(tmp_path / "c.csv"),
           "--best", str(tmp_path / "none.json")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        # Two checkpoints on disk: the first is surely registered with Ray's controller by then.
        while time.time() < deadline and len(list((tmp_path / "ckpt").glob("train-*/checkpoint_*/checkpoint.pt"))) < 2:
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.5)
        assert time.time() < deadline, "no checkpoint appeared"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, at once
        proc.wait()
    assert not (tmp_path / "m.json").exists()
    edited = _params_file(tmp_path, synthetic_shards, num_workers=1, epochs=4, storage_path=storage,
                          max_failures=0, cpus_per_worker=1.0, epochs_by_arch={"resnet18": None, "resnet152": 9},
                          sections={"eval": {"batch_size": 5, "ray_min_images": 0}, "tune": {"num_samples": 7},
                                    "registry": {"alias": "best"}})
    assert edited == params and yaml.safe_load(params.read_text())["eval"]["batch_size"] == 5  # rewritten
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    final = json.loads((tmp_path / "m.json").read_text())
    assert final["epochs"] == 4
    assert final["resumed_at_epochs"] and final["resumed_at_epochs"][0] >= 1, final  # not started over
    assert "resumed from checkpoint at epoch" in out.stdout

    assert len(list((tmp_path / "ckpt").glob("train-*"))) == 1  # one Ray run, not a second one from epoch 0
    curve = (tmp_path / "c.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == ["1", "2", "3", "4"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    runs = tracking.experiment_runs("resnet-pipeline", "tags.`dvc.stage` = 'train@resnet18'")
    assert [r.info.run_id for r in runs] == [final["mlflow_run_id"]]  # the killed run, reopened
    assert runs[0].info.status == "FINISHED"
    assert sorted({s for s, _ in tracking.metric_history(final["mlflow_run_id"], "val_top1_err")}) == [1, 2, 3, 4]
