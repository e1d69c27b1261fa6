"""The cluster path for real, on this machine.

- A Ray head started the way the cluster configs start theirs (`ray start --head`, `RAY_AUTH_MODE=token` with a
  token file, the dashboard and its Jobs API on loopback, `PIPELINE_WORKSPACE` in the node's environment) runs
  the documented submission, `ray job submit --working-dir . --runtime-env infra/ray/runtime_env.yaml --
  bash infra/ray/entrypoint.sh`, on a tiny params file to SUCCEEDED, and the DAG's outputs land in the
  workspace. The same submission without the token, or with a wrong one, is refused.
- Checkpoints under a `file://` `train.storage_path` (a pyarrow filesystem URI, as `s3://` is on a cluster)
  resume: a 1-epoch run continued to 2 epochs restores epoch 1 and trains only epoch 2.

The head is isolated from any other Ray on the machine: its own short temp dir (Ray's socket paths have a length
limit), free ports for every server, its token under tmp_path. Teardown ends exactly the processes it started
(found by session id and an environment marker), never with `ray stop`, which stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, write_params
from tests.ray_session import free_ports

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent  # not resolved: .venv/bin/python is a symlink to the base interpreter
RAY = str(VENV_BIN / "ray")

# The documented submission (docs/cluster.md section 2; tests/test_infra.py holds
# every documented command to this entrypoint and runtime env).
RUNTIME_ENV = "infra/ray/runtime_env.yaml"
ENTRYPOINT = ["bash", "infra/ray/entrypoint.sh"]
COMMIT = "c1057e5c0ffee0000000000000000000deadbeef"  # what `--metadata-json` passes in place of .git

# The whole DAG in about two minutes on 2 cores: one arch, one epoch, one tune trial of one epoch, 3 classes.
TINY_DAG = {
    "data.synthetic.num_classes": 3,
    "data.synthetic.train_per_class": 8,
    "data.synthetic.val_per_class": 4,
    "data.synthetic.image_size": 32,
    "data.rows_per_shard": 16,
    "data.workers": 1,
    "model.archs": ["resnet18"],
    "train.epochs": 1,
    "train.epochs_by_arch": {"resnet18": None},  # dvc.yaml keys train@ARCH on the arch's own entry
    "train.batch_size": 8,
    "train.lr_warmup_epochs": 0,
    "train.num_workers": 1,
    "tune.archs": ["resnet18"],  # the one kind trained here
    "tune.num_samples": 1,
    "tune.epochs": 1,
    "tune.lr_warmup_epochs": [0],
    "tune.time_budget_s": 60,
}
# Extra experiments this path does not need; switched off when params.yaml has them.
OPTIONAL_OFF = {"degradation.enabled": False}

HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 540
MARKER = "RESNET_PIPELINE_TEST_HEAD"  # in the environment of every process of the test's head


def _base_env() -> dict[str, str]:
    """This environment without anything that would point Ray, MLflow or the entrypoint elsewhere."""
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "MLFLOW_TRACKING_URI", "PIPELINE_WORKSPACE", "PIPELINE_PARAMS", "PIPELINE_RUN_GROUP",
                "PIPELINE_GIT_COMMIT", "PIPELINE_KILL_WORKER", MARKER):
        env.pop(key, None)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@dataclass
class Head:
    dashboard: str  # http://127.0.0.1:PORT: the Jobs API, what RAY_ADDRESS names for `ray job ...`
    gcs_port: int
    temp_dir: Path
    workspace: Path
    token: str
    home_without_token: Path

    def env(self, token: str | None) -> dict[str, str]:
        """A client's environment as docs/cluster.md sets it up; token None: no token anywhere."""
        env = _base_env()
        env["RAY_ADDRESS"] = self.dashboard
        if token is None:
            env["HOME"] = str(self.home_without_token)  # nor a ~/.ray/auth_token to fall back on
        else:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        return env

    def ray(self, *args: str, token: str | None, cwd: Path | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAY, *args], cwd=cwd, env=self.env(token), capture_output=True, text=True,
                              timeout=timeout)


def _processes_of(session: int, marker: str) -> list:
    """The processes `ray start` left behind: its session (the daemons) or the marker in their environment
    (Ray workers, the job's entrypoint in its own session), and all their children. Nobody else's."""
    import psutil

    found = {}
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (os.getsid(p.pid) == session or p.environ().get(MARKER) == marker):
                found[p.pid] = p
        except (psutil.Error, OSError):
            continue
    for p in list(found.values()):
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _end_head(session: int, marker: str, grace_s: float = 5) -> None:
    import psutil

    assert session != os.getsid(0), "the head must run in a session of its own"
    procs = _processes_of(session, marker)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:  # gcs_server and the autoscaler monitor often outlive SIGTERM (seen)
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    base = tmp_path_factory.mktemp("cluster")
    # Ray's socket paths (TEMP/session_<date>_<pid>/sockets/plasma_store) must stay under 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    home, empty_home = base / "home", base / "no-token-home"
    home.mkdir()
    empty_home.mkdir()
    workspace = base / "workspace"  # PIPELINE_WORKSPACE: the cluster's shared volume
    marker = uuid.uuid4().hex

    # Ray's own generator, writing to this HOME's ~/.ray/auth_token (never the user's); the head reads it
    # through RAY_AUTH_TOKEN_PATH, as infra/ray/cluster-aws.yaml's nodes read theirs.
    gen_env = {**_base_env(), "HOME": str(home)}
    out = subprocess.run([RAY, "get-auth-token", "--generate"], env=gen_env, capture_output=True, text=True,
                         timeout=60)
    token_file = home / ".ray" / "auth_token"
    assert out.returncode == 0 and token_file.is_file(), out.stderr
    token_file.chmod(0o600)
    token = token_file.read_text().strip()
    assert len(token) >= 32

    from pipeline.runtime import LOCAL_DATA_CPUS

    gcs, dash, *other = free_ports(9)
    head_env = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                "PIPELINE_WORKSPACE": str(workspace), MARKER: marker}
    cmd = [
        RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--include-dashboard", "true", "--dashboard-agent-listen-port", str(other[0]),
        "--dashboard-agent-grpc-port", str(other[1]), "--runtime-env-agent-port", str(other[2]),
        "--metrics-export-port", str(other[3]), "--node-manager-port", str(other[4]),
        "--object-manager-port", str(other[5]), "--ray-client-server-port", str(other[6]),
        "--temp-dir", str(temp_dir),
        # As init_ray sizes a local Ray: the cores plus logical CPUs for Ray Data (ingest starves otherwise).
        "--num-cpus", str((os.cpu_count() or 1) + LOCAL_DATA_CPUS), "--object-store-memory", str(512 * 2**20),
        "--disable-usage-stats",
    ]
    # A session of its own: every daemon `ray start` leaves behind keeps it, which is how teardown finds them.
    proc = subprocess.Popen(cmd, env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        try:
            started, _ = proc.communicate(timeout=HEAD_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`ray start --head` did not return in {HEAD_START_TIMEOUT_S} s")
        assert proc.returncode == 0, started[-4000:]
        yield Head(f"http://127.0.0.1:{dash}", gcs, temp_dir, workspace, token, empty_home)
    finally:
        _end_head(proc.pid, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, repo: Path, submission_id: str, token: str | None) -> subprocess.CompletedProcess[str]:
    """The documented submission, with a known id and without waiting (the caller follows the logs)."""
    args = ["job", "submit", "--working-dir", ".", "--runtime-env", RUNTIME_ENV,
            "--metadata-json", json.dumps({"git_commit": COMMIT}), "--submission-id", submission_id, "--no-wait",
            "--", *ENTRYPOINT]
    deadline = time.monotonic() + 90
    while True:
        out = head.ray(*args, token=token, cwd=repo)
        # Right after `ray start` the head's dashboard agent may not be up yet (docs/cluster.md, section 7).
        if "No available agent" not in out.stdout + out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(3)


@pytest.mark.ray
# Slow (~1.5 min) and off the default run: the fault-tolerance drill
# (tests/test_fault_tolerance.py::test_killed_worker_then_killed_driver_resume_one_run) resumes from a `file://`
# storage_path too (after killing the driver), in every `make test`.
@pytest.mark.slow
def test_file_uri_storage_resumes_a_run_from_its_checkpoint(synthetic_shards: Path, tmp_path: Path) -> None:
    import ray

    from pipeline.config import load_params
    from pipeline.runtime import init_ray
    from pipeline.training.trainer import build_trainer, make_job, run

    storage = (tmp_path / "ckpt").as_uri()
    assert storage.startswith("file:///")
    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", f"train.storage_path={storage}", "train.epochs=2",
        "train.batch_size=16", "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.lr=0.05",
    ])
    was_running = ray.is_initialized()
    init_ray()
    try:
        # The same run name on the same storage: the second fit restores the first one's last checkpoint.
        first = run(build_trainer(make_job(p, "resnet18", 0.05, 0, 1, None), p, name="resume", num_workers=1,
                                  storage_path=storage))
        second = run(build_trainer(make_job(p, "resnet18", 0.05, 0, 2, None), p, name="resume", num_workers=1,
                                   storage_path=storage))
    finally:
        if not was_running:
            ray.shutdown()
    assert [h["epoch"] for h in first.history] == [1] and first.state["resumed_at"] == []
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.state["resumed_at"] == [1], "the second run must resume after epoch 1, not start over"
    assert second.history[0] == first.history[0], "epoch 1 was trained again"
    run_dir = tmp_path / "ckpt" / "resume"
    assert Path(str(second.path).removeprefix("file://")) == run_dir
    checkpoints = sorted(run_dir.glob("checkpoint_*/checkpoint.pt"))
    assert len(checkpoints) == 2, checkpoints  # one per epoch, both written through the file:// filesystem


@pytest.mark.ray
def test_head_refuses_submissions_without_the_token(ray_head: Head, tmp_path: Path) -> None:
    # The Jobs API itself, asked without a token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    repo = copy_repo(tmp_path / "repo")
    no_token = _submit(ray_head, repo, "refused-no-token", token=None)
    assert no_token.returncode != 0
    assert "Missing authentication token" in no_token.stdout + no_token.stderr, no_token.stderr[-3000:]

    wrong = _submit(ray_head, repo, "refused-wrong-token", token="0" * 64)
    assert wrong.returncode != 0
    assert "Invalid authentication token" in wrong.stdout + wrong.stderr, wrong.stderr[-3000:]

    jobs = ray_head.ray("job", "list", token=ray_head.token)
    assert jobs.returncode == 0, jobs.stderr[-3000:]
    assert "refused-" not in jobs.stdout, "a refused submission was recorded"


@pytest.mark.ray
@pytest.mark.e2e
def test_documented_job_runs_the_dag_on_a_token_authenticated_head(ray_head: Head, tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    present = yaml.safe_load((repo / "params.yaml").read_text())
    optional = {k: v for k, v in OPTIONAL_OFF.items() if k.split(".")[0] in present}
    write_params(repo, {**TINY_DAG, **optional})
    submission_id = f"pipeline-test-{uuid.uuid4().hex[:8]}"

    submitted = _submit(ray_head, repo, submission_id, token=ray_head.token)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    try:
        follow = ray_head.ray("job", "logs", "--follow", submission_id, token=ray_head.token,
                              timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ray_head.ray("job", "stop", submission_id, token=ray_head.token)
        pytest.fail(f"job {submission_id} did not end in {JOB_TIMEOUT_S} s")
    log = follow.stdout
    status = ray_head.ray("job", "status", submission_id, token=ray_head.token)
    said = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # the CLI colours its output
    assert f"Job '{submission_id}' succeeded" in said, said[-2000:] + log[-6000:]

    ws = Path(os.path.realpath(ray_head.workspace))
    # The entrypoint ran in the workspace, with the commit from the metadata, and every stage joined this head.
    assert f"workspace: {ws}" in log
    assert f"commit: {COMMIT}" in log
    assert "Ray: stages join the cluster at RAY_ADDRESS=" in log and f":{ray_head.gcs_port}" in log
    assert "Connecting to existing Ray cluster" in log
    assert "finished: exit code 0" in log

    # The DAG's outputs are in the workspace (the cluster's shared volume), not in the submitter's copy.
    assert (ws / "dvc.lock").is_file() and not (repo / "models").exists()
    assert json.loads((ws / "tune/best.json").read_text())["archs"]["resnet18"]["trials"] == 1
    assert (ws / "models/resnet18/model.pt").is_file() and (ws / "models/resnet18/meta.json").is_file()
    train = json.loads((ws / "metrics/train/resnet18.json").read_text())
    assert train["epochs"] == 1 and train["resumed_at_epochs"] == []
    evaluation = json.loads((ws / "metrics/eval/resnet18.json").read_text())
    assert evaluation["n_images"] == 3 * 4  # every val image once
    assert "| resnet18 |" in (ws / "reports/error_table.md").read_text()
    (record,) = json.loads((ws / "reports/registry.json").read_text())
    assert record["arch"] == "resnet18" and record["alias"] == "champion"

    # Rank 0 logged its epochs into the workspace's MLflow store, the same one the stage's driver uses; the
    # upload under the head's temp dir got none of its own.
    with sqlite3.connect(ws / "mlflow.db") as db:
        (n,) = db.execute(
            "SELECT COUNT(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "WHERE r.name = 'train-resnet18' AND m.key = 'val_top1_err' AND m.step = 1"
        ).fetchone()
    assert n == 1
    assert not list(ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*/mlflow.db"))
