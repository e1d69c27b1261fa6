"""A killed worker and then a killed driver resume one run from its last checkpoints (real Ray, real MLflow)."""

from __future__ import annotations

import contextlib
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


# Long enough that the driver is killed (two checkpoints after the worker's kill in epoch 3) before the end.
EPOCHS = 7


def _checkpoints(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ckpt").glob("train-*/checkpoint_*/checkpoint.pt"))


@pytest.mark.ray
def test_killed_worker_then_killed_driver_resume_one_run(synthetic_shards, tmp_path, monkeypatch) -> None:
    """One drill, two faults, one real Ray and one real MLflow run throughout:

    1. rank 1 of 2 is killed in the middle of epoch 3 (an OOM kill or a lost node): Ray Train restarts the worker
       group within the same driver, which resumes from the last checkpoint (train.max_failures);
    2. later the driver itself is killed with everything it started (a lost head or a cancelled job); the rerun
       (`stages.train` again, after an edit of params that do not change the trajectory,
       pipeline/training/identity.py) reopens the same Ray run and the same MLflow run from the last checkpoint.

    With EMA, fp16 + GradScaler and mixup on: the EMA weights, the scaler and every rank's RNG streams come back
    from each checkpoint, so the EMA was updated once per step of the whole run across both restarts."""
    import torch

    from pipeline import tracking
    from pipeline.training.checkpoint import load_train_state

    marker = tmp_path / "killed.txt"
    storage = f"file://{tmp_path / 'ckpt'}"  # a URI (pyarrow filesystem), as on a cluster with shared storage
    run = {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 2, "epochs": EPOCHS, "storage_path": storage,
           "model_ema_decay": 0.9, "model_ema_steps": 1, "amp": "fp16", "mixup_alpha": 0.2}
    params = _params_file(tmp_path, synthetic_shards, **run)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # Epoch index 2, after its 2nd step, rank 1. Not right after a report: Ray's controller registers a
           # reported checkpoint asynchronously, so a crash seconds after one may resume from the checkpoint
           # before it (seen in CI); what must never happen is starting over.
           "PIPELINE_KILL_WORKER": f"2,2,1,{marker}"}
    env.pop("RAY_ADDRESS", None)  # the stage starts its own Ray, whose workers inherit this environment
    cmd = [sys.executable, "-m", "stages.train", "--params", str(params), "--arch", "resnet18",
           "--out", str(tmp_path / "model"), "--metrics", str(tmp_path / "m.json"), "--curve", str(tmp_path / "c.csv"),
           "--best", str(tmp_path / "none.json")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 420
    try:
        # The worker was killed and, after it, two more checkpoints were made (rank 0's log says so; the folder
        # keeps only the newest few): the first of them is surely registered with Ray's controller by then.
        seen = None
        while time.time() < deadline:
            assert proc.poll() is None, "training ended before the driver could be killed: " + (
                tmp_path / "first.log").read_text()[-3000:]
            made = (tmp_path / "first.log").read_text().count("Checkpoint successfully created")
            if marker.exists() and seen is None:
                seen = made
            if seen is not None and made >= seen + 2:
                break
            time.sleep(0.2)
        assert time.time() < deadline, "no worker kill or no checkpoint after it"
    finally:
        with contextlib.suppress(ProcessLookupError):  # gone already: the assertion above says why
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, at once
        proc.wait()
        log.close()
    assert marker.exists(), "the worker fault was not injected"
    assert not (tmp_path / "m.json").exists()

    edited = _params_file(tmp_path, synthetic_shards, **{**run, "max_failures": 0, "cpus_per_worker": 1.0},
                          epochs_by_arch={"resnet18": None, "resnet152": 9},
                          sections={"eval": {"batch_size": 5, "ray_min_images": 0}, "tune": {"num_samples": 7},
                                    "registry": {"alias": "best"}})
    assert edited == params and yaml.safe_load(params.read_text())["eval"]["batch_size"] == 5  # rewritten
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from checkpoint at epoch" in out.stdout

    final = json.loads((tmp_path / "m.json").read_text())
    assert final["epochs"] == EPOCHS
    resumed = final["resumed_at_epochs"]
    assert len(resumed) == 2 and 1 <= resumed[0] < resumed[1], final  # two resumes, neither started over
    assert len(list((tmp_path / "ckpt").glob("train-*"))) == 1  # one Ray run, not a second one from epoch 0
    curve = (tmp_path / "c.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve[1:]] == [str(e) for e in range(1, EPOCHS + 1)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    runs = tracking.experiment_runs("resnet-pipeline", "tags.`dvc.stage` = 'train@resnet18'")
    assert [r.info.run_id for r in runs] == [final["mlflow_run_id"]]  # the killed run, reopened
    assert runs[0].info.status == "FINISHED"
    steps = {s for s, _ in tracking.metric_history(final["mlflow_run_id"], "val_top1_err")}
    assert sorted(steps) == list(range(1, EPOCHS + 1))

    state = load_train_state(max(_checkpoints(tmp_path), key=lambda f: f.parent.name).parent)
    steps_per_epoch = 64 // 16  # synthetic_shards: 64 train images, global batch 16
    assert state["ema"]["updates"] == EPOCHS * steps_per_epoch, "EMA restarted instead of resuming"
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]  # fp16: the scaler's state
    rng = state["rng"]
    assert isinstance(rng, list) and len(rng) == 2 and all(set(r) == {"cpu", "cuda", "mix"} for r in rng)
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"]), "each rank keeps its own stream"
    # The exported model is the EMA's weights, and they moved away from the raw weights.
    blob = torch.load(tmp_path / "model" / "model.pt", weights_only=True)
    key = "layer1.0.conv1.weight"
    assert torch.equal(blob["state_dict"][key], state["ema"]["weights"][key])
    assert not torch.equal(state["ema"]["weights"][key], state["model"][key])
