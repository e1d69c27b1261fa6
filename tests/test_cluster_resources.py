"""A stage on a cluster that grows: it asks for what it needs, waits for the node that brings it, then runs.

Two Ray nodes on this machine, as an autoscaling cluster looks at start-up and a minute later: a head with one CPU
(`ray start --head`), then a worker node with the CPUs a training worker asks for (`ray start --address`), started
only after the train stage is already waiting. Without that node the stage stops after
`cluster.wait_for_resources_s`, naming what is missing and the keys to change. Teardown ends exactly the
processes these `ray start` calls left (tests/test_cluster.py's helpers), never with `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.ray_session import free_ports
from tests.test_cluster import HEAD_START_TIMEOUT_S, MARKER, RAY, _base_env, _end_head

ROOT = Path(__file__).resolve().parent.parent


def _start(args: list[str], env: dict[str, str]) -> int:
    """`ray start ...` in a session of its own; returns that session id (= the pid) for teardown."""
    proc = subprocess.Popen([RAY, "start", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HEAD_START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"`ray start {args[0]}` did not return in {HEAD_START_TIMEOUT_S} s")
    assert proc.returncode == 0, out[-4000:]
    return proc.pid


def _node_ports() -> list[str]:
    agent, grpc, runtime_env, metrics, manager, objects = free_ports(6)
    return ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(manager), "--object-manager-port", str(objects)]


def _params(tmp_path: Path, shards: Path, wait_s: float) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["shards_dir"] = str(shards)
    params["train"].update({"storage_path": str(tmp_path / "ckpt"), "epochs": 1, "epochs_by_arch": {},
                            "batch_size": 16, "use_tuned": False, "lr": 0.05, "lr_warmup_epochs": 0,
                            "num_workers": 1, "cpus_per_worker": 2})
    params["cluster"] = {"wait_for_resources_s": wait_s}
    path = tmp_path / f"params-{wait_s:g}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.ray
# Slow (two `ray start` nodes, two stage runs: 1.5-4 min here) and off the default run: the waiting logic is
# covered by tests/test_gpu_path.py::test_a_growing_cluster_is_waited_for_then_timed_out_naming_what_is_missing,
# and the request on a real joined cluster by tests/test_cluster.py's documented job (RAY_ADDRESS set).
@pytest.mark.slow
def test_train_waits_for_the_node_that_brings_its_resources(synthetic_shards: Path, tmp_path: Path) -> None:
    temp_dir = Path(tempfile.mkdtemp(prefix="raygrow-", dir="/tmp"))  # Ray's socket paths stay short
    marker = uuid.uuid4().hex
    home = tmp_path / "home"  # no ~/.ray/auth_token there: the head runs without token auth
    home.mkdir()
    env = {**_base_env(), "HOME": str(home), MARKER: marker, "PYTHONPATH": str(ROOT)}
    gcs, client = free_ports(2)
    sessions = []
    try:
        sessions.append(_start(["--head", "--port", str(gcs), "--include-dashboard", "false",
                                "--ray-client-server-port", str(client), "--temp-dir", str(temp_dir),
                                "--num-cpus", "1", "--object-store-memory", str(256 * 2**20),
                                "--disable-usage-stats", *_node_ports()], env))
        stage_env = {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}",
                     "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

        def stage(params: Path) -> list[str]:
            return [sys.executable, "-m", "stages.train", "--params", str(params), "--arch", "resnet18",
                    "--out", str(tmp_path / "model"), "--metrics", str(tmp_path / "m.json"),
                    "--curve", str(tmp_path / "c.csv"), "--best", str(tmp_path / "none.json")]

        # 1. Nothing joins: the stage stops after its timeout and names what is missing.
        out = subprocess.run(stage(_params(tmp_path, synthetic_shards, 3)), cwd=tmp_path, env=stage_env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode != 0
        expected = "training resnet18 needs 1 x {CPU: 2} + 1 x {CPU: 1}; after waiting 3 s"
        assert expected in out.stderr, out.stderr[-3000:]
        assert "still lacks 2 more CPU (needs 3, has 1)" in out.stderr
        assert "cluster.wait_for_resources_s" in out.stderr and "train.cpus_per_worker" in out.stderr
        assert not (tmp_path / "m.json").exists()

        # 2. The node joins while the stage waits: it goes on and completes.
        log = (tmp_path / "stage.log").open("w")
        proc = subprocess.Popen(stage(_params(tmp_path, synthetic_shards, 240)), cwd=tmp_path, env=stage_env,
                                stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "waiting up to 240 s" not in (tmp_path / "stage.log").read_text():
                assert proc.poll() is None, (tmp_path / "stage.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the stage never started waiting"
                time.sleep(0.5)
            sessions.append(_start(["--address", f"127.0.0.1:{gcs}", "--num-cpus", "3",
                                    "--object-store-memory", str(256 * 2**20), "--disable-usage-stats",
                                    *_node_ports()], env))
            assert proc.wait(timeout=400) == 0, (tmp_path / "stage.log").read_text()[-4000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            log.close()
        text = (tmp_path / "stage.log").read_text()
        assert "resources are up (2 node(s))" in text
        assert json.loads((tmp_path / "m.json").read_text())["epochs"] == 1
    finally:
        for session in reversed(sessions):
            _end_head(session, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
