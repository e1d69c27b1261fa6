"""MLflow for real: a tracking server on loopback (started by infra/mlflow/local/serve.sh), the register stage
against it, `mlflow models serve` answering JSON requests, the champion rule, pickle-free loading, system
metrics, and credentials that never leave the environment. No mocks; every server binds 127.0.0.1 on a free
port and is stopped in a `finally`.

The trained models are built without Ray (a ResNet-18 with random weights written by `export_model_dir`,
as the train stage writes it) and the evaluation JSONs are written by hand: what is under test is what
MLflow stores, serves and decides, not the accuracy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import tracking
from pipeline.config import Params, load_params
from pipeline.data.shards import read_manifest
from pipeline.publish import InferenceModel, decide_champion, example_batch, model_card, publish_model, top_k

ROOT = Path(__file__).resolve().parent.parent
SERVE_SH = ROOT / "infra" / "mlflow" / "local" / "serve.sh"
MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
RESIZE, CROP = 36, 32  # params.yaml's val_resize_size / val_crop_size
RUN_GROUP = "test-mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in its own process group (servers fork workers); always stop the whole group."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Workers of the group that outlived the parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout_s}s:\n{log.read_text()[-4000:]}")


def group_cmdlines(pgid: int) -> list[str]:
    """The command lines of the live processes of process group `pgid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    return out


def post_json(url: str, payload: Any, timeout_s: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def client_env(server: dict[str, Any]) -> dict[str, str]:
    """The environment of a subprocess that talks to `server` (no network beyond loopback, no pip check)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"MLFLOW_TRACKING_URI": server["uri"], "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
                "PYTHONPATH": str(ROOT), "PIPELINE_RUN_GROUP": RUN_GROUP,
                # `mlflow models serve` execs `uvicorn` from PATH: the venv's bin first, as `make` sets it.
                "PATH": f"{MLFLOW_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    return env


def start_server(tmp: Path, extra_env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Any]:
    @contextlib.contextmanager
    def run() -> Iterator[dict[str, Any]]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update({"MLFLOW_SERVER_DIR": str(tmp / "server"), "MLFLOW_PORT": str(port),
                    "MLFLOW_SERVER_WORKERS": "1", "MLFLOW_BIN": str(MLFLOW_BIN), **(extra_env or {})})
        log = tmp / "server.log"
        with process(["bash", str(SERVE_SH)], env, log) as proc:
            uri = f"http://127.0.0.1:{port}"
            wait_http(f"{uri}/health", proc, log)
            yield {"uri": uri, "dir": tmp / "server", "log": log, "proc": proc}

    return run()


@contextlib.contextmanager
def tracking_env(uri: str, **extra: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("MLFLOW_")]:
            mp.delenv(k)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
        mp.setenv("PIPELINE_RUN_GROUP", RUN_GROUP)
        for k, v in extra.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module", autouse=True)
def quiet_torch_trace() -> Iterator[None]:
    """torch.export emits thousands of DEBUG records on its `torch.__trace` logger; pytest's log capture
    formats each one, which made a registration several times slower. Stop them at that logger."""
    log = logging.getLogger("torch.__trace")
    before = log.propagate
    log.propagate = False
    yield
    log.propagate = before


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`serve.sh` (sqlite backend and artifacts in tmp, no auth) with MLFLOW_TRACKING_URI pointing at it."""
    with start_server(tmp_path_factory.mktemp("mlflow")) as srv, tracking_env(srv["uri"]):
        yield srv


def make_params(shards: Path, *overrides: str) -> Params:
    return load_params(ROOT / "params.yaml", [f"data.shards_dir={shards}", *overrides])


def make_trained(tmp: Path, p: Params, *, seed: int, top1_err: float, top5_err: float = 0.0,
                 minival_top1_err: float | None = None) -> tuple[Path, Path]:
    """models/resnet18 as the train stage exports it (random weights) and its evaluation JSON (with the minival
    selection error the champion rule reads: `top1_err` unless given)."""
    from pipeline.models import build_model
    from pipeline.training.checkpoint import export_model_dir

    manifest = read_manifest(p.data.shards_dir)
    torch.manual_seed(seed)
    net = build_model("resnet18", num_classes=int(manifest["num_classes"]))
    state = {  # the keys of loop._report's state
        "model": net.state_dict(), "optimizer": {}, "scaler": {}, "ema": None, "epoch": 2,
        "history": [{"epoch": 1, "val_top1_err": 80.0}, {"epoch": 2, "val_top1_err": top1_err}],
        "rng": torch.get_rng_state(), "arch": "resnet18", "model_kwargs": {},
        "num_classes": int(manifest["num_classes"]), "classes": [c["wnid"] for c in manifest["classes"]],
        "class_names": {c["wnid"]: c["name"] for c in manifest["classes"]},
        "eval_transform": {"resize": RESIZE, "crop": CROP, "interpolation": "bilinear", "antialias": True,
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "config": p.model_dump(mode="json"), "lr": 0.05, "lr_warmup_epochs": 1,
        "git_commit": "0123456789abcdef", "data_fingerprint": str(manifest["fingerprint"]),
    }
    model_dir = export_model_dir(tmp / f"models-{seed}" / "resnet18", state)
    n_val = int(manifest["splits"]["val"]["n_images"])
    ev = {"arch": "resnet18", "top1_err": top1_err, "top5_err": top5_err, "n_images": n_val,
          "num_classes": int(manifest["num_classes"]), "protocol": f"1-crop resize {RESIZE} crop {CROP}",
          "data_fingerprint": str(manifest["fingerprint"]), "epochs": 2,
          "selection": {"split": "minival", "top1_err": top1_err if minival_top1_err is None else minival_top1_err,
                        "top5_err": 0.0, "n_images": 8, "protocol": "1-crop", "in_train": True}}
    eval_path = tmp / f"eval-{seed}.json"
    eval_path.write_text(json.dumps(ev))
    return model_dir, eval_path


def local_probs(model_dir: Path, x: np.ndarray) -> np.ndarray:
    from pipeline.training.checkpoint import load_model_dir

    net, _ = load_model_dir(model_dir)
    with torch.no_grad():
        return InferenceModel(net).eval()(torch.from_numpy(x)).numpy()


def resized(x: np.ndarray, side: int) -> np.ndarray:
    """float32 (N, 3, H, W) pixels resized to (N, 3, side, side), as a client with its own image size sends them."""
    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear", antialias=True)
    return t.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def registered(server: dict[str, Any], synthetic_shards: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Any]:
    """One train + register against the server: the first version of resnet18-synthetic, champion."""
    tmp = tmp_path_factory.mktemp("registered")
    p = make_params(synthetic_shards)
    model_dir, eval_path = make_trained(tmp, p, seed=0, top1_err=62.5, top5_err=0.0)
    train_metrics = tmp / "train.json"
    train_metrics.write_text(json.dumps({"mlflow_run_id": "a-train-run-id"}))
    table = tmp / "error_table.md"
    table.write_text("| arch | top-1 err |\n|---|---|\n| resnet18 | 62.50 |\n")
    t0 = time.perf_counter()
    record = publish_model(p, "resnet18", model_dir, eval_path, train_metrics_path=train_metrics,
                            error_table_path=table)
    return {"p": p, "record": record, "model_dir": model_dir, "seconds": time.perf_counter() - t0}


# --- (a) tracking + registry through a real server ---------------------------------------------------------------


def test_register_against_server_tags_card_alias_artifacts(registered: dict[str, Any], synthetic_shards: Path
                                                           ) -> None:
    from mlflow.tracking import MlflowClient

    p, rec = registered["p"], registered["record"]
    manifest = read_manifest(synthetic_shards)
    fp = str(manifest["fingerprint"])
    assert rec["name"] == "resnet18-synthetic" and rec["version"] == "1"
    assert rec["alias"] == "champion" and rec["champion_moved"] and rec["why"] == "no champion yet"

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("resnet18-synthetic", "champion")
    assert mv.version == "1" and mv.run_id == rec["run_id"]
    assert mv.tags["data_fingerprint"] == fp and float(mv.tags["top1_err"]) == 62.5
    assert mv.tags["champion.moved"] == "true" and mv.tags["champion.version"] == "1"
    assert mv.tags["train_run_id"] == "a-train-run-id" and mv.tags["params_digest"] == p.digest()
    card = mv.description
    for needle in ("# resnet18 on synthetic (SYNTHETIC", "top-1 error 62.50%", "chance-level top-1 error: 75.00%",
                   "## Data", f"{manifest['splits']['train']['n_images']} train", fp, "## Recipe", "lr 0.05",
                   "## Input and output", "(N, 3, 32, 32)", '{"inputs": [[[[...]]]]}', "## Lineage",
                   "a-train-run-id", rec["run_id"], "## References", "arXiv:1512.03385", "top-1 30.24%"):
        assert needle in card, needle
    assert "resnet-pipeline" in client.get_registered_model("resnet18-synthetic").description

    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["dvc.stage"] == "register" and tags["data.fingerprint"] == fp
    assert tags["params.digest"] == p.digest() and tags["pipeline.run_group"] == RUN_GROUP
    assert tags["git.commit"] and tags["registered.version"] == "1"
    assert run.data.metrics["top1_err"] == 62.5
    artifacts = {a.path for d in ("config", "model_dir", "eval", "reports")
                 for a in client.list_artifacts(run.info.run_id, d)}
    assert {"config/params.yaml", "model_dir/meta.json", "reports/error_table.md"} <= artifacts
    assert any(a.startswith("eval/") for a in artifacts)
    config = client.download_artifacts(run.info.run_id, "config/params.yaml")
    assert str(synthetic_shards) in Path(config).read_text()

    meta = tracking.model_metadata("models:/resnet18-synthetic@champion")
    assert meta["classes"] == [c["wnid"] for c in manifest["classes"]] and meta["eval_transform"]["crop"] == CROP


# --- (b) `mlflow models serve` ------------------------------------------------------------------------------------


def test_models_serve_answers_json_with_probabilities(registered: dict[str, Any], server: dict[str, Any],
                                                      synthetic_shards: Path, tmp_path: Path) -> None:
    name = registered["record"]["name"]
    port = free_port()
    cmd = [str(MLFLOW_BIN), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    x = example_batch(str(synthetic_shards), RESIZE, CROP, n=3)  # (3, 3, 32, 32) float32 pixels 0-255
    expected = local_probs(registered["model_dir"], x)
    log = tmp_path / "serve.log"
    with process(cmd, client_env(server), log) as proc:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post_json(url, {"inputs": x[:2].tolist()})
        assert status == 200, body
        probs = np.asarray(body["predictions"], dtype=np.float64)
        assert probs.shape == (2, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert probs.argmax(axis=1).tolist() == expected[:2].argmax(axis=1).tolist()
        np.testing.assert_allclose(probs, expected[:2], atol=1e-4)
        # One image, and integer pixels (a client that sends the decoded uint8 values as they are).
        status, body = post_json(url, {"inputs": x[2:3].round().astype(int).tolist()})
        assert status == 200, body
        assert np.asarray(body["predictions"]).shape == (1, 4)
        # Other image sizes (the exported program's H and W are dynamic): a smaller crop and a FixRes-style larger
        # test resolution, each answered with the probabilities of the model itself at that size.
        for side in (16, 48):
            xs = resized(x[:2], side)
            status, body = post_json(url, {"inputs": xs.tolist()})
            assert status == 200, (side, body)
            np.testing.assert_allclose(np.asarray(body["predictions"]), local_probs(registered["model_dir"], xs),
                                       atol=1e-4)
        # A wrong shape (2 channels) is refused with a message naming the expected shape, not a crash.
        status, body = post_json(url, {"inputs": x[:2, :2].tolist()})
        assert status == 400, body
        assert "(-1, 3, -1, -1)" in json.dumps(body), body
    meta = tracking.model_metadata(f"models:/{name}@champion")
    best = top_k(probs, meta["classes"], meta["class_names"], k=2)
    assert best[0][0]["class_id"] == int(expected[0].argmax()) and best[0][0]["name"].startswith("synthetic")


def test_version_source_is_the_training_run_with_dataset_input_and_run_group(server: dict[str, Any],
                                                                             synthetic_shards: Path,
                                                                             tmp_path: Path) -> None:
    """What a user clicks through: the registered version's source run is the training run (its curves), which
    lists the shards as its dataset (digest = the data fingerprint) and sits, with the register run, under one
    parent run named after the run group; the experiment opens on its runs (model-training kind)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    p = make_params(synthetic_shards, "registry.model_name=src-{arch}-{dataset}", "tracking.experiment=lineage")
    manifest = read_manifest(synthetic_shards)
    fp = str(manifest["fingerprint"])
    # The training run as train_arch leaves it: per-epoch metrics, the shards as input, FINISHED.
    train_run = tracking.start_run("lineage", "train-resnet18", tracking.base_tags("train@resnet18", p.digest(), fp))
    for _ in range(2):  # a resumed run logs its input again: still one dataset input
        tracking.log_shards_input(train_run, manifest, synthetic_shards, "train")
    for epoch in (1, 2):
        tracking.log_metrics(train_run, {"val_top1_err": 90.0 - epoch}, step=epoch)
    tracking.end_run(train_run)
    model_dir, eval_path = make_trained(tmp_path, p, seed=7, top1_err=40.0)
    train_metrics = tmp_path / "train.json"
    train_metrics.write_text(json.dumps({"mlflow_run_id": train_run}))
    rec = publish_model(p, "resnet18", model_dir, eval_path, train_metrics_path=train_metrics)

    client = MlflowClient(tracking_uri=server["uri"])
    mv = client.get_model_version_by_alias("src-resnet18-synthetic", "champion")
    assert mv.run_id == train_run == rec["source_run_id"] != rec["run_id"]
    assert mv.tags["register_run_id"] == rec["run_id"]
    assert mv.source.startswith("models:/m-")  # the logged model, which MLflow 3 ties to the run that logged it
    assert mlflow.get_logged_model(mv.source.removeprefix("models:/")).source_run_id == train_run
    source = client.get_run(train_run)
    assert source.info.status == "FINISHED"  # logging the model reopened it and gave its status back
    assert [m.step for m in client.get_metric_history(train_run, "val_top1_err")] == [1, 2]
    (ds,) = source.inputs.dataset_inputs
    assert ds.dataset.name == "synthetic" and ds.dataset.digest == fp[: tracking.DATASET_DIGEST_CHARS]
    assert json.loads(ds.dataset.profile)["fingerprint"] == fp
    assert json.loads(ds.dataset.source)["uri"] == str(synthetic_shards)
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "train"
    parent_id = source.data.tags["mlflow.parentRunId"]
    assert client.get_run(rec["run_id"]).data.tags["mlflow.parentRunId"] == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.run_name == RUN_GROUP and parent.data.tags[tracking.GROUP_PARENT_TAG] == RUN_GROUP
    assert {r.info.run_id for r in tracking.experiment_runs("lineage")} == {train_run, rec["run_id"]}
    assert client.get_experiment_by_name("lineage").tags["mlflow.experimentKind"] == "custom_model_development"


# --- (c) the champion rule ----------------------------------------------------------------------------------------


def test_champion_moves_only_to_a_better_version_on_the_same_data(server: dict[str, Any], synthetic_shards: Path,
                                                                  tmp_path: Path) -> None:
    p = make_params(synthetic_shards, "registry.model_name=champ-{arch}-{dataset}")
    name = "champ-resnet18-synthetic"
    # The val errors run opposite to minival's: the champion must follow minival, never the table's val set.
    better = publish_model(p, "resnet18", *make_trained(tmp_path, p, seed=1, top1_err=56.25, minival_top1_err=50.0))
    worse = publish_model(p, "resnet18", *make_trained(tmp_path, p, seed=2, top1_err=43.75, minival_top1_err=56.25))
    assert (better["version"], worse["version"]) == ("1", "2")
    assert better["alias"] == "champion" and worse["alias"] is None and not worse["champion_moved"]
    assert "does not beat champion v1" in worse["why"] and worse["champion_version"] == "1"
    assert tracking.alias_version(name, "champion").version == "1"
    v2 = tracking.get_model_version(name, "2")
    assert v2.tags["champion.moved"] == "false" and "does not beat" in v2.tags["champion.why"]

    best = publish_model(p, "resnet18", *make_trained(tmp_path, p, seed=3, top1_err=60.0, minival_top1_err=43.75))
    assert best["alias"] == "champion" and "beats champion v1" in best["why"]
    assert tracking.alias_version(name, "champion").version == "3"
    assert [v.version for v in tracking.model_versions(name)] == ["1", "2", "3"]


def test_metrics_of_other_data_are_refused_before_anything_is_logged(server: dict[str, Any], synthetic_shards: Path,
                                                                     tmp_path: Path) -> None:
    p = make_params(synthetic_shards, "tracking.experiment=refused")
    model_dir, eval_path = make_trained(tmp_path, p, seed=5, top1_err=10.0)
    ev = json.loads(eval_path.read_text())
    eval_path.write_text(json.dumps({**ev, "data_fingerprint": "0" * 64}))  # a stale metrics/eval file
    with pytest.raises(ValueError, match="rerun the evaluate stage"):
        publish_model(p, "resnet18", model_dir, eval_path)
    assert tracking.experiment_runs("refused") == []


def test_decide_champion_rule() -> None:
    champion = {"version": "4", "data_fingerprint": "f" * 64, "select_top1_err": repr(30.000000000000004)}
    assert decide_champion(29.9, "f" * 64, champion)[0]
    assert not decide_champion(30.000000000000004, "f" * 64, champion)[0]  # a tie keeps the champion
    assert not decide_champion(30.1, "f" * 64, champion)[0]
    moved, why = decide_champion(99.0, "e" * 64, champion)  # other data: not comparable
    assert moved and "other data" in why
    assert decide_champion(50.0, "f" * 64, None) == (True, "no champion yet")


# --- (d) loading without pickle or model code ---------------------------------------------------------------------


def test_registered_model_loads_without_pickle_or_code_execution(registered: dict[str, Any], server: dict[str, Any],
                                                                 synthetic_shards: Path, tmp_path: Path) -> None:
    name = registered["record"]["name"]
    x = example_batch(str(synthetic_shards), RESIZE, CROP, n=3)
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, numpy as np, torch, mlflow.pyfunc, mlflow.pytorch\n"
        "x = np.load(sys.argv[2])\n"
        "pyfunc = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "torch_module = mlflow.pytorch.load_model(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    t = torch_module(torch.from_numpy(x)).numpy()\n"
        "big = np.load(sys.argv[3])\n"
        "print(json.dumps({'pyfunc': np.asarray(pyfunc.predict(x)).tolist(), 'torch': t.tolist(),\n"
        "                  'one': np.asarray(pyfunc.predict(x[:1])).shape[0],\n"
        "                  'big': np.asarray(pyfunc.predict(big)).tolist()}))\n"
    )
    env = {**client_env(server), "MLFLOW_ALLOW_MODEL_CODE_EXECUTION": "false",
           "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    big = resized(x, 56)  # a second image size through pyfunc: 56 px, the model was evaluated at 32
    np.save(tmp_path / "big.npy", big)
    out = subprocess.run([sys.executable, "-c", script, f"models:/{name}@champion", str(tmp_path / "x.npy"),
                          str(tmp_path / "big.npy")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    expected = local_probs(registered["model_dir"], x)
    np.testing.assert_allclose(np.asarray(got["pyfunc"]), expected, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got["torch"]), expected, atol=1e-4)
    assert got["one"] == 1
    np.testing.assert_allclose(np.asarray(got["big"]), local_probs(registered["model_dir"], big), atol=1e-4)


# --- system metrics ------------------------------------------------------------------------------------------------


def test_system_metrics_logged_for_an_explicit_run_id(server: dict[str, Any]) -> None:
    run_id = tracking.start_run("test-system-metrics", "sysmetrics", tracking.base_tags("train@x", "d", "fp"))
    cpu = "system/cpu_utilization_percentage"
    # The block lasts until two samples are logged, however slow the machine (bounded: a monitor that never logs
    # ends the wait and fails below), not a fixed time that a loaded machine may fill with fewer samples.
    with tracking.system_metrics(run_id, sampling_interval_s=0.5):
        deadline = time.monotonic() + 120
        while len(tracking.metric_history(run_id, cpu)) < 2 and time.monotonic() < deadline:
            sum(i * i for i in range(20_000))  # a little CPU work to measure
            time.sleep(0.1)
    tracking.end_run(run_id)
    metrics = tracking.run_metrics(run_id)
    assert cpu in metrics, sorted(metrics)
    assert "system/system_memory_usage_percentage" in metrics
    steps = [s for s, _ in tracking.metric_history(run_id, cpu)]
    assert len(steps) >= 2 and steps == sorted(set(steps)), steps  # one sample per step, in order
    # A run id of None (no tracking) is a no-op.
    with tracking.system_metrics(None):
        pass


# --- credentials ---------------------------------------------------------------------------------------------------


@pytest.mark.server
def test_basic_auth_server_takes_credentials_from_env_and_stores_none(tmp_path: Path) -> None:
    """serve.sh with MLflow's basic-auth app: the server refuses anonymous requests; the pipeline's tracking
    calls authenticate with MLFLOW_TRACKING_USERNAME/PASSWORD from the environment; the password appears
    nowhere: not on a command line, not in what is logged, not in any file the server writes. (A train-like
    run only: with basic auth every request verifies a PBKDF2 hash, which makes a full model registration
    take ~35 s on 2 busy cores; registration through a server is test (a).)"""
    try:
        import flask_wtf  # noqa: F401 - MLflow's basic-auth app needs it (the `mlflow[auth]` extra)
    except ImportError:
        pytest.skip("Flask-WTF is not installed (mlflow[auth]): the basic-auth server cannot start")
    from mlflow.tracking import MlflowClient

    password = "test-Pa55word-" + os.urandom(6).hex()
    auth_env = {"MLFLOW_SERVER_AUTH": "basic", "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                "MLFLOW_AUTH_ADMIN_PASSWORD": password}
    with start_server(tmp_path, auth_env) as srv:
        for cmdline in group_cmdlines(srv["proc"].pid):  # the server and its workers: no secret in `ps`
            assert password not in cmdline and "basic_auth.db" not in cmdline
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{srv['uri']}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        with tracking_env(srv["uri"], MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password):
            run_id = tracking.start_run("auth-check", "train-resnet18", tracking.base_tags("train@resnet18", "d", "fp"),
                                        params={"arch": "resnet18", "lr": 0.1})
            tracking.log_config(run_id, {"train": {"lr": 0.1}, "tracking": {"experiment": "auth-check"}})
            with tracking.system_metrics(run_id, sampling_interval_s=1.0):
                tracking.log_metrics(run_id, {"val_top1_err": 50.0}, step=1)
            note = tmp_path / "meta.json"
            note.write_text(json.dumps({"arch": "resnet18"}))
            tracking.log_artifact(run_id, note)
            tracking.end_run(run_id)
            client = MlflowClient()
            client.create_registered_model("auth-check-model")
            run = client.get_run(run_id)
            assert run.data.metrics["val_top1_err"] == 50.0 and "system/cpu_utilization_percentage" in run.data.metrics
            stored = json.dumps([run.data.params, run.data.tags, run.info.to_proto().__str__()], default=str)
            local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
        assert password not in stored
        # Everything the server wrote (runs database, users database, artifacts), its log, what was downloaded.
        files = [f for f in [*srv["dir"].rglob("*"), *local.rglob("*"), srv["log"]] if f.is_file()]
        assert any(f.name == "basic_auth.db" for f in files) and any(f.name == "meta.json" for f in files)
        for path in files:
            assert password.encode() not in path.read_bytes(), path


# --- pure pieces --------------------------------------------------------------------------------------------------


def test_top_k_and_model_card_without_reference() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    best = top_k(probs, ["a", "b", "c"], {"a": "apple", "b": "bee", "c": "cat"}, k=2)
    assert [[d["wnid"] for d in row] for row in best] == [["b", "c"], ["a", "c"]]
    assert best[0][0] == {"class_id": 1, "wnid": "b", "name": "bee", "prob": 0.6}
    meta = {"eval_transform": {"resize": 36, "crop": 32}, "num_classes": 3, "data_fingerprint": "x" * 64,
            "config": {"train": {"epochs": 2}}, "epochs_trained": 2}
    ev = {"top1_err": 10.0, "top5_err": 0.0, "n_images": 30, "num_classes": 3, "data_fingerprint": "y" * 64}
    card = model_card("resnet56", meta, ev, "custom")
    assert "no ImageNet-1k reference numbers for resnet56" in card
    assert "trained on OTHER data" in card and "SYNTHETIC" not in card
