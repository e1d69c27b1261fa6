"""One real Ray cluster for the whole test session, and a count of every Ray cluster the session starts.

The shared cluster is what the cluster configs start: a head and a worker node, each `ray start` in a session of
its own, 2 CPUs each (4 logical CPUs, what `pipeline.runtime.init_ray` gives a stage on 2 cores), its own short
temp dir and free ports, no token auth on loopback. It starts at the first `ray.init()` that would have started a
local Ray, and is ended with the test session (by session id and an environment marker, never `ray stop`).

`redirect_init` wraps `ray.init`: a call that would start a local Ray joins the shared cluster instead, as a job
of its own. Workers of a local Ray inherit the driver's environment (tests set PIPELINE_KILL_WORKER, the shard
read log, MLflow's URI, AWS_* before `ray.init`); a shared cluster's workers cannot, so every variable that differs
from the session's starting environment travels as the job's `runtime_env` env_vars, which every task, actor and
Train worker of that job gets. A call naming an address, under RAY_ADDRESS, asking for more CPUs than the shared
cluster has, or from a test marked `own_ray` (its claim is about a cluster of its own size or kind) is unchanged.

`ClusterCounter` counts clusters by their GCS server: every process named `gcs_server` whose environment carries
this session's marker (in-process `ray.init`, `ray start --head`, and the stages `dvc repro` or a CLI runs in
subprocesses all inherit it), polled twice a second, attributed to the test running when it appeared.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
RUN_MARKER = "PIPELINE_TEST_SESSION"  # in the environment of every process this test session starts
SHARED_MARKER = "PIPELINE_TEST_SHARED_RAY"  # in the environment of the shared cluster's processes
NODE_CPUS = 2
NODES = 2
# Driver-side settings that are no business of the cluster's workers (or change with every test).
NOT_FORWARDED = ("RAY_", "PYTEST_", SHARED_MARKER)
# What a fresh environment would not have: kept out of the shared cluster's nodes.
NODE_ENV_DROP = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "PIPELINE_KILL_WORKER", "PIPELINE_SYNC_PROBE")
# ray.init keywords a driver joining a cluster may pass; the rest (num_cpus, include_dashboard, ...) size or
# configure a cluster being started.
JOIN_KEYWORDS = ("log_to_driver", "logging_level", "logging_format", "namespace", "ignore_reinit_error",
                 "configure_logging")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def end_sessions(sessions: list[int], marker: str, grace_s: float = 5) -> None:
    """SIGTERM, then SIGKILL, every process of these sessions or with `marker` in its environment."""
    import psutil

    procs = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (os.getsid(p.pid) in sessions or p.environ().get(SHARED_MARKER) == marker):
                procs.append(p)
        except (psutil.Error, OSError):
            continue
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


class SharedCluster:
    """Started on first use; `address` is its GCS (what RAY_ADDRESS would name)."""

    def __init__(self, base_env: dict[str, str]) -> None:
        self.base_env = base_env
        self.address: str | None = None
        self.sessions: list[int] = []
        self.marker = uuid.uuid4().hex
        self.temp_dir: Path | None = None
        self.joins = 0
        self._lock = threading.Lock()

    def node_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.base_env.items() if k not in NODE_ENV_DROP}
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT),
                   # A second raylet registering on a loaded 2-core machine can take longer than Ray's 10 s default.
                   RAY_raylet_start_wait_time_s="120")
        env[SHARED_MARKER] = self.marker
        return env

    def _ray_start(self, args: list[str]) -> None:
        proc = subprocess.Popen([RAY, "start", *args, "--num-cpus", str(NODE_CPUS), "--disable-usage-stats",
                                 "--object-store-memory", str(384 * 2**20)],
                                env=self.node_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.sessions.append(proc.pid)  # the daemons keep the session of the `ray start` that left them
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"shared test cluster: `ray start {args[0]}` did not return in 240 s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"shared test cluster: `ray start {args[0]}` failed:\n{out[-3000:]}")

    def _node_count(self) -> int:
        code = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        out = subprocess.run([sys.executable, "-c", code], env=self.node_env(), capture_output=True, text=True,
                             timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    def ensure(self) -> str:
        with self._lock:
            if self.address is None:
                self._start()
            assert self.address is not None
            return self.address

    def _start(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="raytest-", dir="/tmp"))  # Ray's socket paths stay short
        gcs, *p = free_ports(15)
        address = f"127.0.0.1:{gcs}"
        try:
            self._ray_start(["--head", "--port", str(gcs), "--include-dashboard", "false",
                             "--dashboard-port", str(p[0]), "--ray-client-server-port", str(p[1]),
                             "--temp-dir", str(self.temp_dir), *self._node_ports(p[2:8])])
            self.address = address
            self._ray_start(["--address", address, *self._node_ports(p[8:14])])
            deadline = time.monotonic() + 120
            while self._node_count() < NODES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"shared test cluster: the worker node did not join {address} in 120 s")
                time.sleep(1)
        except BaseException:
            self.address = None
            self.stop()
            raise

    @staticmethod
    def _node_ports(p: list[int]) -> list[str]:
        return ["--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
                "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
                "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5])]

    def forwarded_env(self) -> dict[str, str]:
        """What this driver's environment sets beyond the nodes': the job's env_vars."""
        nodes = self.node_env()
        return {k: v for k, v in os.environ.items()
                if not k.startswith(NOT_FORWARDED) and nodes.get(k) != v}

    def stop(self) -> None:
        if self.sessions:
            end_sessions(self.sessions, self.marker)
            self.sessions = []
        if self.temp_dir is not None:
            import shutil

            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def redirect_init(original: Callable[..., Any], cluster: SharedCluster,
                  opted_out: Callable[[], bool]) -> Callable[..., Any]:
    """`ray.init` that joins `cluster` where it would have started a local Ray (see the module docstring)."""

    def init(address: str | None = None, **kw: Any) -> Any:
        cpus = kw.get("num_cpus")
        if (address is not None or os.environ.get("RAY_ADDRESS") or opted_out()
                or (cpus is not None and cpus > NODE_CPUS * NODES) or kw.get("local_mode")):
            return original(address, **kw)
        runtime_env = dict(kw.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **cluster.forwarded_env()}
        joined = {k: kw[k] for k in JOIN_KEYWORDS if k in kw}
        result = original(address=cluster.ensure(), runtime_env=runtime_env, **joined)
        cluster.joins += 1
        return result

    init.joins_shared_cluster = True  # type: ignore[attr-defined]
    return init


class ClusterCounter:
    """Counts the GCS servers (= Ray clusters) this session's processes start; see the module docstring."""

    def __init__(self, marker: str, interval_s: float = 0.5) -> None:
        self.marker = marker
        self.interval_s = interval_s
        self.current = "(collection)"
        self.seen: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ray-cluster-counter", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            self.scan(psutil)
            self._stop.wait(self.interval_s)

    def scan(self, psutil: Any) -> None:
        for p in psutil.process_iter(["name", "create_time"]):
            try:
                if p.info["name"] != "gcs_server":
                    continue
                key = (p.pid, p.info["create_time"])
                if key not in self.seen and p.environ().get(RUN_MARKER) == self.marker:
                    self.seen[key] = self.current
            except (psutil.Error, OSError):
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def by_test(self) -> Counter[str]:
        return Counter(self.seen.values())
