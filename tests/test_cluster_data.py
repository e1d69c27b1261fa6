"""Data on a real 2-node Ray cluster on this machine: two `ray start` (a head and a worker node, one CPU
each, free ports, sessions of their own, torn down by session like tests/test_cluster.py's head).

- Distributed prepare (`prepare_on: ray`, one task per shard on both nodes) writes exactly the bytes of the
  1-process run; its driver killed midway (SIGKILL) and rerun, it completes with the same manifest, keeping
  the shards the first run finished.
- Before training on several nodes every node must read the same manifest at shards_dir: the worker node is
  started with another S3 endpoint (a second, empty object store), and the check stops naming that node.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import wait_for_http
from tests.ray_session import free_ports
from tests.test_cluster import MARKER, RAY, _base_env, _end_head

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bucket"
# Ray 2.60's `ray start --head` turns token authentication on by default; this loopback-only test cluster
# opts out (tests/test_cluster.py covers token auth).
NO_AUTH = {"RAY_AUTH_MODE": "disabled"}
# A second raylet registering on a loaded 2-core machine can take longer than Ray's default 10 s wait (seen).
SLOW_START = {"RAY_raylet_start_wait_time_s": "120"}
KEYS = {"AWS_ACCESS_KEY_ID": "AKIAPIPELINECLUSTER18", "AWS_SECRET_ACCESS_KEY": "cluster-test-secret",
        "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

pytestmark = pytest.mark.ray


def _moto(log: Path) -> tuple[subprocess.Popen, str]:
    import pyarrow.fs as pafs

    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(endpoint, server, f"moto server (log: {log})")
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                      access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                      region="us-east-1").create_dir(BUCKET)
    return server, endpoint


@dataclass
class Cluster:
    address: str  # 127.0.0.1:GCS_PORT, what RAY_ADDRESS names
    endpoint: str  # the object store the head node (and the driver) use
    worker_node_id: str


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-2000:]
    return proc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("cluster_data")
    temp_dir = Path(tempfile.mkdtemp(prefix="raydata-", dir="/tmp"))  # Ray's socket paths must stay short
    marker = uuid.uuid4().hex
    store_a, endpoint_a = _moto(base / "moto-a.log")
    store_b, endpoint_b = _moto(base / "moto-b.log")
    common = {**_base_env(), **KEYS, **NO_AUTH, "PYTHONPATH": str(ROOT), MARKER: marker}
    for key in ("AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        common.pop(key, None)
    gcs, *p = free_ports(17)
    head = worker = None
    try:
        head = _start([RAY, "start", "--head", "--port", str(gcs), "--num-cpus", "1", "--include-dashboard", "false",
                       "--dashboard-port", str(p[15]),
                       "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                       "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                       "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5]),
                       "--ray-client-server-port", str(p[6]), "--temp-dir", str(temp_dir),
                       "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"],
                      {**common, "AWS_ENDPOINT_URL": endpoint_a})
        before = _node_ids(f"127.0.0.1:{gcs}")
        # The worker node's environment names ANOTHER object store: what a misconfigured node looks like.
        worker = _start([RAY, "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "1",
                         "--node-manager-port", str(p[7]), "--object-manager-port", str(p[8]),
                         "--dashboard-agent-listen-port", str(p[9]), "--dashboard-agent-grpc-port", str(p[10]),
                         "--runtime-env-agent-port", str(p[11]), "--metrics-export-port", str(p[12]),
                         "--object-store-memory", str(256 * 2**20), "--disable-usage-stats"],
                        {**common, **SLOW_START, "AWS_ENDPOINT_URL": endpoint_b})
        deadline = time.monotonic() + 60
        while len(after := _node_ids(f"127.0.0.1:{gcs}")) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        (worker_id,) = set(after) - set(before)
        yield Cluster(f"127.0.0.1:{gcs}", endpoint_a, worker_id)
    finally:
        for proc in (worker, head):
            if proc is not None:
                _end_head(proc.pid, marker)
        for server in (store_a, store_b):
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_ids(address: str) -> list[str]:
    code = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", code], env={**_base_env(), **NO_AUTH, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Large enough to be killed midway: 48 shards of 4 images, each re-encoded (96 px > max_side 48)."""
    from pipeline.data.synthetic import generate_synthetic_imagenet

    root = tmp_path / "raw"
    generate_synthetic_imagenet(root, num_classes=4, train_per_class=40, val_per_class=8, image_size=96, seed=0,
                                workers=1)
    return root


OPTS = {"max_side": 48, "rows_per_shard": 4, "progress": False}


def _shard_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*.parquet"))}


def _noting_node(nodes: Path):  # noqa: ANN202 - a Ray task function
    """pipeline.data.prepare.build_shard that leaves `<node id>-<uuid>` in `nodes` where it runs (self-contained:
    Ray ships it by value to the nodes, whose pipeline.data.prepare is the unpatched one)."""

    def build_shard(*args: object, **kwargs: object) -> object:
        import uuid

        import ray

        from pipeline.data.prepare import build_shard as real

        (nodes / f"{ray.get_runtime_context().get_node_id()}-{uuid.uuid4().hex}").touch()
        return real(*args, **kwargs)

    return build_shard


def test_distributed_prepare_is_byte_identical_and_resumes_after_a_kill(cluster: Cluster, raw: Path,
                                                                         tmp_path: Path, monkeypatch) -> None:
    import ray

    from pipeline.data import prepare
    from pipeline.data.prepare import prepare_shards

    reference = prepare_shards(raw, tmp_path / "one", workers=1, prepare_on="local", **OPTS)

    # The driver killed midway: a separate process that stops after recording its 3rd shard (it says so in a
    # file and sleeps), then is SIGKILLed. Killing it is not a race against how fast prepare runs.
    out = tmp_path / "ray"
    paused = tmp_path / "paused"
    code = f"""
import time
import pipeline.data.prepare as prepare

run_ray = prepare._run_ray

def stop_after_three(todo, out, max_side, jpeg_quality, record, *rest):
    seen = []

    def noted(result):
        record(result)
        seen.append(1)
        if len(seen) == 3:
            open({str(paused)!r}, "w").close()
            time.sleep(3600)

    run_ray(todo, out, max_side, jpeg_quality, noted, *rest)

prepare._run_ray = stop_after_three
prepare.prepare_shards({str(raw)!r}, {str(out)!r}, prepare_on="ray", max_side=48, rows_per_shard=4, progress=False)
"""
    env = {**_base_env(), **NO_AUTH, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    done = out / ".done"
    deadline = time.monotonic() + 300
    while driver.poll() is None and not paused.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert paused.exists(), "the driver never recorded 3 shards"
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in done.glob("*.json")}
    assert len(kept) == 3, sorted(kept)

    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    # Each shard task notes the node it ran on (a file per task, beside the output): no sampling to miss one.
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    monkeypatch.setattr(prepare, "build_shard", _noting_node(nodes))
    try:
        ray.init(log_to_driver=False, logging_level="ERROR")  # the cluster RAY_ADDRESS names
        again = prepare_shards(raw, out, prepare_on="auto", **OPTS)  # auto: RAY_ADDRESS is set
    finally:
        ray.shutdown()
    busy = {f.name.split("-")[0] for f in nodes.iterdir()}
    assert again == reference
    assert (out / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert _shard_digests(out) == _shard_digests(tmp_path / "one")  # sha256 of every shard, 1 process vs 2 nodes
    assert {p.name: p.stat().st_mtime_ns for p in done.glob("*.json") if p.name in kept} == kept  # not redone
    assert cluster.worker_node_id in busy and len(busy) == 2, busy  # the tasks ran on both nodes


def test_a_node_that_sees_other_data_stops_the_run_naming_it(cluster: Cluster, raw: Path, monkeypatch) -> None:
    import ray

    from pipeline.data.prepare import prepare_shards
    from pipeline.data.shards import check_nodes_see
    from pipeline.data.sources import DataError

    for key, value in {**KEYS, **NO_AUTH, "AWS_ENDPOINT_URL": cluster.endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    uri = f"s3://{BUCKET}/shards"
    manifest = prepare_shards(raw, uri, prepare_on="local", workers=1, **OPTS)
    ray.init(address=cluster.address, logging_level="ERROR")
    try:
        with pytest.raises(DataError) as err:
            check_nodes_see(uri, manifest["fingerprint"])
    finally:
        ray.shutdown()
    message = str(err.value)
    assert cluster.worker_node_id[:12] in message and uri in message and "no shard manifest" in message
