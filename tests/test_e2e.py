"""End to end: the real `dvc repro` of dvc.yaml on a tiny params file, in a temporary copy of the repository,
with real Ray, Ray Tune and MLflow. Then: a second repro does nothing, `dvc status` is clean, and every
registered champion classifies a batch of 3 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import copy_repo, write_params

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ["resnet18", "resnet50"]  # one BasicBlock and one Bottleneck net; `make repro` runs all five

TINY = {
    "data.synthetic.num_classes": 4,
    "data.synthetic.train_per_class": 24,
    "data.synthetic.val_per_class": 6,
    "data.synthetic.image_size": 40,
    "data.rows_per_shard": 32,
    "model.archs": ARCHS,
    "train.epochs": 2,
    "train.epochs_by_arch": {},
    "train.batch_size": 16,
    "tune.num_samples": 2,
    "tune.epochs": 2,
    "tune.time_budget_s": 90,
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> dict:
    repo = copy_repo(tmp_path_factory.mktemp("clone"))
    write_params(repo, TINY)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "PIPELINE_RUN_GROUP": "e2e-test",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        run(cmd, repo, env, 60)
    t0 = time.perf_counter()
    first = run(["dvc", "repro"], repo, env, 1200)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = run(["dvc", "repro"], repo, env, 120)
    second_s = time.perf_counter() - t0
    status = run(["dvc", "status"], repo, env, 120)
    return {"repo": repo, "env": env, "first": first, "first_s": first_s, "second": second,
            "second_s": second_s, "status": status}


@pytest.mark.e2e
def test_repro_builds_every_output(repro: dict) -> None:
    repo: Path = repro["repo"]
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["n_images"] == 4 * 24
    best = json.loads((repo / "tune/best.json").read_text())
    assert TINY["tune.num_samples"] == best["trials"]
    assert 0.05 <= best["lr"] <= 0.2
    table = (repo / "reports/error_table.md").read_text()
    assert "SYNTHETIC" in table
    for arch in ARCHS:
        ev = json.loads((repo / f"metrics/eval/{arch}.json").read_text())
        assert ev["n_images"] == 4 * 6  # every val image exactly once
        assert f"| {arch} |" in table
        assert (repo / f"models/{arch}/model.pt").is_file()
        curve = (repo / f"plots/train/{arch}.csv").read_text().splitlines()
        assert len(curve) == 1 + TINY["train.epochs"]


@pytest.mark.e2e
def test_second_repro_is_a_noop_and_status_clean(repro: dict) -> None:
    assert "Running stage" not in repro["second"].stdout
    assert repro["second_s"] < 30
    assert "up to date" in repro["status"].stdout.lower() or repro["status"].stdout.strip() == ""


@pytest.mark.e2e
def test_champions_load_from_registry_and_classify_3_images(repro: dict) -> None:
    repo: Path = repro["repo"]
    records = json.loads((repo / "reports/registry.json").read_text())
    assert [r["arch"] for r in records] == ARCHS
    assert all(r["alias"] == "champion" for r in records)
    script = (
        "import json, sys, numpy as np, torch, mlflow.pytorch\n"
        "from pipeline import tracking\n"
        "from pipeline.registry import example_batch\n"
        "x = torch.from_numpy(np.concatenate([example_batch('data/shards', 36, 32, n=3)]))\n"
        "for name in sys.argv[1:]:\n"
        "    m = tracking.load_registered_model(f'models:/{name}@champion')\n"
        "    p = m(x)\n"
        "    assert tuple(p.shape) == (3, 4), p.shape\n"
        "    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-4)\n"
        "    print(name, p.argmax(1).tolist())\n"
    )
    out = run([sys.executable, "-c", script, *[r["name"] for r in records]], repo, repro["env"], 300)
    assert out.stdout.count("[") == len(ARCHS)


@pytest.mark.e2e
def test_predict_from_checkpoint_and_registry_and_bad_image(repro: dict) -> None:
    repo: Path = repro["repo"]
    image = sorted((repo / "data/synthetic/val").glob("*.JPEG"))[0]
    for model in ("models/resnet18", "models:/resnet18-synthetic@champion"):
        out = run([sys.executable, "-m", "pipeline", "predict", "--model", model, "--image", str(image), "--topk", "3"],
                  repo, repro["env"], 300)
        lines = out.stdout.strip().splitlines()
        assert lines[0] == str(image) and len(lines) == 4, out.stdout
        assert "synthetic" in lines[1]  # class names travel with the model
    bad = repo / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    out = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--model", "models/resnet18", "--image",
                          str(bad)], cwd=repo, env=repro["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "broken.JPEG" in out.stderr


@pytest.mark.e2e
def test_dvc_metrics_and_plots_show(repro: dict) -> None:
    repo: Path = repro["repo"]
    metrics = run(["dvc", "metrics", "show"], repo, repro["env"], 120).stdout
    for arch in ARCHS:
        assert f"metrics/eval/{arch}.json" in metrics and f"metrics/train/{arch}.json" in metrics
    run(["dvc", "plots", "show", "-o", str(repo / "dvc_plots")], repo, repro["env"], 120)
    assert (repo / "dvc_plots/index.html").is_file()
