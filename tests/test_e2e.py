"""End to end: the real `dvc repro` of dvc.yaml on a tiny params file, in a temporary copy of the repository,
with real Ray, Ray Tune and MLflow. Then: a second repro does nothing, `dvc status` is clean, and every
registered champion classifies a batch of 3 images."""

from __future__ import annotations

import json
import os
import re
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
    "train.epochs_by_arch": {arch: None for arch in ARCHS},  # dvc.yaml keys train@ARCH on the arch's entry
    "train.batch_size": 16,
    "tune.num_samples": 2,
    "tune.epochs": 2,
    "tune.time_budget_s": 300,  # an upper bound, not the usual time: a loaded 2-core host needed more than 90 s
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
    second = run(["dvc", "repro"], repo, env, 120)
    status = run(["dvc", "status"], repo, env, 120)
    return {"repo": repo, "env": env, "first": first, "first_s": first_s, "second": second,
            "status": status}


@pytest.mark.e2e
def test_repro_builds_every_output(repro: dict) -> None:
    repo: Path = repro["repo"]
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    held_out = manifest["splits"]["minival"]["per_class"]  # params.yaml's data.minival_per_class
    assert held_out >= 1 and manifest["splits"]["minival"]["n_images"] == 4 * held_out
    assert manifest["splits"]["train"]["n_images"] == 4 * (24 - held_out)
    best = json.loads((repo / "tune/best.json").read_text())
    assert best["selected_on"] == "minival" and sorted(best["archs"]) == sorted(ARCHS)
    for entry in best["archs"].values():
        assert TINY["tune.num_samples"] == entry["trials"]
    table = (repo / "reports/error_table.md").read_text()
    assert "SYNTHETIC" in table
    for arch in ARCHS:  # each row's lr: its own search, chosen on minival; trained on the full train set
        assert f"({arch} @ minival)" in table
        assert f"- {arch}: lr " in table and "selected on the **minival** split" in table
        train = json.loads((repo / f"metrics/train/{arch}.json").read_text())
        assert train["lr_source"]["tuned_arch"] == arch and train["n_train_images"] == 4 * 24
        # The row trained with the lr its own search chose (an lr inside the search bounds proves nothing).
        assert train["lr_source"]["tuned_lr"] == best["archs"][arch]["lr"]
    for arch in ARCHS:
        ev = json.loads((repo / f"metrics/eval/{arch}.json").read_text())
        assert ev["n_images"] == 4 * 6  # every val image exactly once
        assert f"| {arch} |" in table
        assert (repo / f"models/{arch}/model.pt").is_file()
        curve = (repo / f"plots/train/{arch}.csv").read_text().splitlines()
        assert len(curve) == 1 + TINY["train.epochs"]


@pytest.mark.e2e
def test_second_repro_is_a_noop_and_status_clean(repro: dict) -> None:
    # What a no-op means is that no stage ran (timings belong to `make bench`, not to an assertion).
    assert "Running stage" not in repro["second"].stdout
    assert "up to date" in repro["status"].stdout.lower() or repro["status"].stdout.strip() == ""


@pytest.mark.e2e
def test_champions_load_from_registry_and_classify_3_images(repro: dict) -> None:
    repo: Path = repro["repo"]
    records = json.loads((repo / "reports/registry.json").read_text())
    assert [r["arch"] for r in records] == ARCHS
    assert all(r["alias"] == "champion" for r in records)
    # Chosen on minival, never on val: each record carries the minival error its evaluation measured.
    for r in records:
        sel = json.loads((repo / f"metrics/eval/{r['arch']}.json").read_text())["selection"]
        assert sel["split"] == "minival" and sel["n_images"] > 0 and r["select_split"] == "minival"
        assert r["select_top1_err"] == sel["top1_err"]
    script = (
        "import json, sys, numpy as np, torch, mlflow.pytorch\n"
        "from pipeline import tracking\n"
        "from pipeline.publish import example_batch\n"
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


@pytest.mark.e2e
def test_mlflow_lineage_of_one_repro(repro: dict) -> None:
    """Through MLflow's client, what the UI shows: the champion's source run is the training run (curves, system
    metrics, config); train, tune and evaluate runs list the shards (digest = data fingerprint); the repro's runs
    are children of one parent named after the run group; the experiment is a model-training one."""
    import mlflow
    from mlflow.tracking import MlflowClient

    repo: Path = repro["repo"]
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    # The registry explicitly too: left out, it follows whatever registry URI an earlier test in this process set.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    fp = json.loads((repo / "data/shards/manifest.json").read_text())["fingerprint"]
    exp = client.get_experiment_by_name("resnet-pipeline")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    (group,) = [r for r in runs if r.data.tags.get("pipeline.group_parent") == "e2e-test"]
    assert group.info.run_name == "e2e-test"
    by_id = {r.info.run_id: r for r in runs}
    # every other run is the group's child, or a child of one (tune trials, degradation's nets)
    for r in runs:
        if r is not group:
            parent = by_id[r.data.tags["mlflow.parentRunId"]]
            assert parent is group or parent.data.tags["mlflow.parentRunId"] == group.info.run_id, r.info.run_name
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == group.info.run_id]
    stages = {r.data.tags["dvc.stage"] for r in children}
    expected = {"tune", "register", "degradation", *(f"{s}@{a}" for a in ARCHS for s in ("train", "evaluate"))}
    assert expected <= stages, stages
    for r in children:
        if r.data.tags["dvc.stage"].split("@")[0] in ("train", "tune", "evaluate"):
            digests = [d.dataset.digest for d in r.inputs.dataset_inputs]
            assert digests == [fp[:36]], (r.info.run_name, digests)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for arch in ARCHS:
        train_run = json.loads((repo / f"metrics/train/{arch}.json").read_text())["mlflow_run_id"]
        mv = client.get_model_version_by_alias(f"{arch}-synthetic", "champion")
        assert mv.run_id == train_run
        assert mlflow.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == train_run
        source = client.get_run(train_run)
        assert source.data.tags["dvc.stage"] == f"train@{arch}" and source.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(train_run, "val_top1_err")] == [1, 2]
        assert any(k.startswith("system/") for k in source.data.metrics)
        assert "config/params.yaml" in {a.path for a in client.list_artifacts(train_run, "config")}


@pytest.mark.e2e
@pytest.mark.ray
def test_cli_train_on_other_data_leaves_every_dvc_output_alone(repro: dict, tiny_imagefolder_tree) -> None:
    repo: Path = repro["repo"]
    refused = subprocess.run([sys.executable, "-m", "pipeline", "train", "--arch", "resnet18", "--out",
                              "models/resnet18"], cwd=repo, env=repro["env"], capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "an output of dvc.yaml" in refused.stderr, refused.stderr
    data = os.fspath(tiny_imagefolder_tree)
    out = run([sys.executable, "-m", "pipeline", "train", "--arch", "resnet18", "--data", data, "--epochs", "1",
               "--batch-size", "4"], repo, repro["env"], 600)
    folder = Path("runs") / "resnet18-imagefolder"
    assert f"model: {folder / 'model'}" in out.stdout, out.stdout
    meta = json.loads((repo / folder / "model/meta.json").read_text())
    assert meta["classes"] == list(tiny_imagefolder_tree.wnids)  # the other data's classes, not the pipeline's
    assert (repo / folder / "metrics.json").is_file()
    prepared = re.search(r"^prepare: \S+ -> (\S+)$", out.stdout, re.M)
    assert prepared, out.stdout
    shards = repo / prepared.group(1)  # the dataset's own folder beside data/shards, never inside it
    assert (shards / "manifest.json").is_file() and shards.parent == (repo / "data/shards").parent
    assert shards.name.startswith("shards-") and shards != repo / "data/shards"
    status = run(["dvc", "status"], repo, repro["env"], 120).stdout
    assert "up to date" in status.lower(), status


@pytest.mark.e2e
@pytest.mark.ray
def test_dvc_exp_run_with_a_param_edit_and_exp_show(repro: dict) -> None:
    """`dvc exp run -S` (what the README shows) on the finished repro: the edit of train.lr does not change the
    trajectory (the tuned lr is used), so train@resnet18 reruns by resuming its finished Ray run, not retraining.
    Runs last: it changes the workspace."""
    from mlflow.tracking import MlflowClient

    repo: Path = repro["repo"]
    train_run = json.loads((repo / "metrics/train/resnet18.json").read_text())["mlflow_run_id"]
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           **repro["env"]}  # an experiment is a git commit
    out = run(["dvc", "exp", "run", "-n", "lr005", "-S", "train.lr=0.05", "-S", "model.archs=[resnet18]"],
              repo, env, 600)
    assert "Running stage 'train@resnet18'" in out.stdout and "train@resnet50" not in out.stdout, out.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    # the same MLflow run, no epoch trained again
    assert [m.step for m in client.get_metric_history(train_run, "val_top1_err")] == [1, 2]
    assert json.loads((repo / "metrics/train/resnet18.json").read_text())["mlflow_run_id"] == train_run
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env, 120).stdout)
    exps = [e for base in shown for e in (base.get("experiments") or [])]
    names = [e.get("name") for e in exps]
    assert "lr005" in names, names
    diff = run(["dvc", "params", "diff"], repo, env, 120).stdout
    assert "train.lr" in diff and "model.archs" in diff, diff
