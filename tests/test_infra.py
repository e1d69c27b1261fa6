"""Offline checks of the cluster and MLflow infrastructure: infra/, .rayignore, docs/cluster.md.

No network, no cluster, no Docker: the manifests are parsed and held to the properties docs/cluster.md
promises (token auth on, dashboard not exposed, no secret in a file, one entrypoint everywhere), Ray's own
code packages a test tree with our .rayignore, and the two entrypoint scripts run against stubs.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
ENTRYPOINT_SCRIPT = "infra/ray/entrypoint.sh"
ENTRYPOINT = ["bash", ENTRYPOINT_SCRIPT]
RUNTIME_ENV = "infra/ray/runtime_env.yaml"
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}

YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in YAML_FILES:
        for doc in load_docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                yield path, doc


def objects_of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def ray_cluster_specs() -> list[dict[str, Any]]:
    """Every RayCluster spec: standalone RayClusters and the clusters RayJobs create."""
    specs = [c["spec"] for c in objects_of_kind("RayCluster")]
    specs += [j["spec"]["rayClusterSpec"] for j in objects_of_kind("RayJob")]
    return specs


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    pod = template["spec"]
    return list(pod.get("containers", [])) + list(pod.get("initContainers", []))


def launcher() -> dict[str, Any]:
    (cfg,) = load_docs(INFRA / "ray/cluster-aws.yaml")
    return cfg


def the_rayjob() -> dict[str, Any]:
    (job,) = objects_of_kind("RayJob")
    return job


# --- every file parses ------------------------------------------------------------------------------------


def test_infra_has_the_expected_manifests() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {
        "ray/cluster-aws.yaml", "ray/runtime_env.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
        "kuberay/prerequisites.yaml", "mlflow/docker-compose.yaml", "mlflow/k8s/mlflow.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path)  # multi-document aware
    assert docs, f"{path} has no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"
    for d in docs:
        if "kind" in d:
            assert d.get("apiVersion") and d.get("metadata", {}).get("name"), f"{path}: {d['kind']} without name"


def test_cluster_launcher_config_passes_rays_own_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(launcher(), json.loads(schema_path.read_text()))


def test_launcher_head_takes_no_work_and_workers_have_8_gpus() -> None:
    cfg = launcher()
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU") == 8 for t in gpu_types)
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


def test_ray_versions_agree_with_the_lock() -> None:
    (pin,) = re.findall(r"^ray==(\S+)$", (REPO / "requirements.txt").read_text(), flags=re.M)
    dockerfile = (INFRA / "docker/Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, flags=re.M)
    assert base.startswith(f"rayproject/ray:{pin}-")
    for spec in ray_cluster_specs():
        assert spec["rayVersion"] == pin


# --- token authentication ---------------------------------------------------------------------------------


def test_token_auth_on_in_the_cluster_launcher() -> None:
    docker = launcher()["docker"]
    # Global run_options apply to the head and every worker container.
    run_options = " ".join(docker["run_options"])
    assert "--env RAY_AUTH_MODE=token" in run_options
    assert re.search(r"--env RAY_AUTH_TOKEN_PATH=/\S+", run_options), "every node needs the token file"
    overrides = " ".join(docker.get("head_run_options", []) + docker.get("worker_run_options", []))
    assert "RAY_AUTH_MODE" not in overrides


def test_token_auth_on_in_every_kuberay_cluster() -> None:
    specs = ray_cluster_specs()
    assert len(specs) >= 2  # the RayCluster and the RayJob's cluster
    for spec in specs:
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token", "KubeRay authOptions.mode must be token"
        assert auth.get("secretName"), "a fixed Secret, so clients know where the token is"
        for template in pod_templates(spec):
            for c in containers(template):
                for e in c.get("env", []):
                    assert e["name"] not in {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, "authOptions owns these"


def test_no_ray_config_turns_token_auth_off() -> None:
    for path in [*YAML_FILES, INFRA / "ray/entrypoint.sh", INFRA / "docker/Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W+disabled", text), path
        assert not re.search(r"^\s*mode:\s*[\"']?disabled", text, flags=re.M), path
    for env in [load_docs(REPO / RUNTIME_ENV)[0], yaml.safe_load(the_rayjob()["spec"]["runtimeEnvYAML"])]:
        assert "RAY_AUTH_MODE" not in env.get("env_vars", {})


# --- nothing exposed --------------------------------------------------------------------------------------


def test_no_service_exposes_a_dashboard_or_server() -> None:
    for path, doc in k8s_objects():
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute"}, path
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") not in EXPOSING_SERVICE_TYPES, path
    for spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") not in EXPOSING_SERVICE_TYPES
        assert not head.get("enableIngress", False)
        assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") not in EXPOSING_SERVICE_TYPES


def test_launcher_dashboard_listens_on_loopback_only() -> None:
    head_start = " ".join(launcher()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_local_mlflow_stack_publishes_on_loopback_only() -> None:
    (compose,) = load_docs(INFRA / "mlflow/docker-compose.yaml")
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


# --- one entrypoint everywhere ----------------------------------------------------------------------------


def submit_commands(path: Path) -> list[list[str]]:
    """Every `ray job submit ... -- CMD` in a file, continuation lines joined, split like a shell would."""
    text = re.sub(r"\\\n\s*(#\s*)?", " ", path.read_text())
    found = []
    for line in text.splitlines():
        start = line.find("ray job submit")
        if start < 0 or " -- " not in line[start:]:
            continue  # prose that names the command without running it
        try:
            found.append(shlex.split(line[start:], comments=True))
        except ValueError:
            found.append(line[start:].split())
    return found


DOCUMENTS = [REPO / "README.md", REPO / "Makefile", *(REPO / "docs").glob("*.md"), *INFRA.rglob("*.md"), *YAML_FILES]


def test_documented_submit_commands_run_the_entrypoint() -> None:
    per_file = {p.relative_to(REPO).as_posix(): submit_commands(p) for p in DOCUMENTS if p.is_file()}
    assert per_file["docs/cluster.md"], "docs/cluster.md must show the submit command"
    assert per_file["infra/ray/cluster-aws.yaml"] and per_file["infra/kuberay/raycluster.yaml"]
    for name, commands in per_file.items():
        for argv in commands:
            assert "--" in argv, f"{name}: {argv}"
            entry = argv[argv.index("--") + 1 :]
            assert entry[:2] == ENTRYPOINT, f"{name}: runs {entry}, not {' '.join(ENTRYPOINT)}"
            options = argv[: argv.index("--")]
            assert options[options.index("--working-dir") + 1] == ".", f"{name}: {argv}"
            has_env = "--runtime-env" in options or "--runtime-env-json" in options
            assert has_env, f"{name}: {argv}"
            if "--runtime-env" in options:
                assert options[options.index("--runtime-env") + 1] == RUNTIME_ENV, f"{name}: {argv}"


def test_rayjob_runs_the_documented_entrypoint_with_the_same_runtime_env() -> None:
    spec = the_rayjob()["spec"]
    assert shlex.split(spec["entrypoint"]) == ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    job_env = yaml.safe_load(spec["runtimeEnvYAML"])
    (cli_env,) = load_docs(REPO / RUNTIME_ENV)
    assert cli_env["env_vars"].items() <= job_env["env_vars"].items()
    # The RayJob uploads the code baked into the image: the Dockerfile's WORKDIR.
    (workdir,) = re.findall(r"^WORKDIR (\S+)$", (INFRA / "docker/Dockerfile").read_text(), flags=re.M)
    assert job_env["working_dir"] == workdir


@pytest.mark.subprocess
def test_entrypoint_script_passes_bash_syntax_check() -> None:
    script = REPO / ENTRYPOINT_SCRIPT
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def _stub_dvc(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    dvc = bin_dir / "dvc"
    dvc.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s|%s|%s|%s\\n" "$PWD" "$PIPELINE_RUN_GROUP" "$PIPELINE_GIT_COMMIT" "$*" >> "{log}"\n'
    )
    dvc.chmod(dvc.stat().st_mode | stat.S_IXUSR)


def _uploaded_copy(root: Path) -> Path:
    """What `ray job submit --working-dir .` unpacks on the head: the repo's DVC files, no .git."""
    src = root / "uploaded"
    (src / ".dvc").mkdir(parents=True)
    (src / ".dvc/config").write_text("[core]\n    autostage = false\n")
    (src / "dvc.yaml").write_text("stages: {}\n")
    (src / "params.yaml").write_text("seed: 1\n")
    (src / "dvc.lock").write_text("laptop lock\n")
    (src / "configs").mkdir()
    (src / "configs/preset.yaml").write_text("seed: 2\n")
    return src


def _run_entrypoint(src: Path, tmp_path: Path, env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.pathsep.join([str(tmp_path / "bin"), str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "PYTHON": sys.executable,
        "HOME": str(tmp_path),
        **env_extra,
    }
    return subprocess.run(
        ["bash", str(REPO / ENTRYPOINT_SCRIPT), *args], cwd=src, env=env, capture_output=True, text=True,
        timeout=60,
    )


@pytest.mark.subprocess
def test_entrypoint_runs_dvc_without_git_in_the_persistent_workspace(tmp_path: Path) -> None:
    log = tmp_path / "dvc.log"
    _stub_dvc(tmp_path / "bin", log)
    src = _uploaded_copy(tmp_path)
    workspace = tmp_path / "shared/resnet-pipeline"
    (workspace / ".dvc").mkdir(parents=True)
    (workspace / "dvc.lock").write_text("workspace lock\n")
    commit = "0123456789abcdef0123456789abcdef01234567"
    job_config = {"metadata": {"job_submission_id": "raysubmit_test", "git_commit": commit}}

    out = _run_entrypoint(
        src, tmp_path,
        {"PIPELINE_WORKSPACE": str(workspace), "PIPELINE_PARAMS": "configs/preset.yaml",
         "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job_config)},
        "train@resnet50",
    )

    assert out.returncode == 0, out.stdout + out.stderr
    ws = str(workspace.resolve())
    group = "commit-0123456789ab"
    assert log.read_text().splitlines() == [
        f"{ws}|{group}|{commit}|config --local core.no_scm true",
        f"{ws}|{group}|{commit}|repro train@resnet50",
    ]
    assert (workspace / "dvc.lock").read_text() == "workspace lock\n", "the upload's dvc.lock must not win"
    assert (workspace / "dvc.yaml").is_file() and (workspace / "params.yaml").read_text() == "seed: 2\n"
    assert re.search(r"^\[entrypoint \S+\] dvc repro train@resnet50$", out.stdout, flags=re.M)
    assert "finished: exit code 0" in out.stdout


def test_every_cluster_keeps_dvcs_hash_cache_in_its_shared_workspace() -> None:
    # DVC's default site cache (/var/tmp/dvc) goes with the pod or container: the next job would re-hash every
    # shard. Every head that runs `dvc repro` must set DVC_SITE_CACHE_DIR inside its PIPELINE_WORKSPACE.
    heads: dict[str, dict[str, str]] = {}
    opts = launcher()["docker"]["run_options"]
    heads["cluster-aws.yaml"] = dict(o.removeprefix("--env ").split("=", 1) for o in opts if o.startswith("--env "))
    for spec in ray_cluster_specs():
        for c in containers(spec["headGroupSpec"]["template"]):
            heads[c["name"] + str(len(heads))] = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert len(heads) >= 3
    for name, env in heads.items():
        workspace = env.get("PIPELINE_WORKSPACE")
        assert workspace and env.get("DVC_SITE_CACHE_DIR", "").startswith(workspace + "/"), (name, env)


@pytest.mark.subprocess
def test_entrypoint_puts_the_hash_cache_in_the_workspace_unless_set(tmp_path: Path) -> None:
    seen = tmp_path / "site_cache.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = f'#!/usr/bin/env bash\nprintf "%s|%s\\n" "$1" "${{DVC_SITE_CACHE_DIR:-}}" >> "{seen}"\n'
    (bin_dir / "dvc").write_text(stub)
    (bin_dir / "dvc").chmod(0o755)
    workspace = tmp_path / "shared/ws"
    out = _run_entrypoint(_uploaded_copy(tmp_path), tmp_path, {"PIPELINE_WORKSPACE": str(workspace)}, "tune")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"repro|{workspace.resolve()}/.dvc/site_cache" in seen.read_text().splitlines()
    seen.unlink()
    shutil.rmtree(tmp_path / "uploaded")
    out = _run_entrypoint(_uploaded_copy(tmp_path), tmp_path, {"PIPELINE_WORKSPACE": str(workspace),
                                                              "DVC_SITE_CACHE_DIR": "/elsewhere"}, "tune")
    assert out.returncode == 0 and "repro|/elsewhere" in seen.read_text().splitlines(), out.stdout + out.stderr


@pytest.mark.subprocess
def test_entrypoint_falls_back_to_the_image_commit_and_runs_in_place(tmp_path: Path) -> None:
    log = tmp_path / "dvc.log"
    _stub_dvc(tmp_path / "bin", log)
    src = _uploaded_copy(tmp_path)
    (src / ".pipeline-commit").write_text("fedcba9876543210fedcba9876543210fedcba98\n")

    out = _run_entrypoint(src, tmp_path, {})

    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    prefix = f"{src.resolve()}|commit-fedcba987654|fedcba9876543210fedcba9876543210fedcba98|"
    assert calls == [prefix + "config --local core.no_scm true", prefix + "repro", prefix + "metrics show"]
    assert (src / "dvc.lock").read_text() == "laptop lock\n"


@pytest.mark.subprocess
def test_entrypoint_refuses_a_folder_that_is_not_the_repository(tmp_path: Path) -> None:
    _stub_dvc(tmp_path / "bin", tmp_path / "dvc.log")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = _run_entrypoint(empty, tmp_path, {})
    assert out.returncode != 0
    assert "--working-dir ." in out.stdout
    assert not (tmp_path / "dvc.log").exists()


# --- what the upload carries ------------------------------------------------------------------------------


def _ray_zip(src: Path, out: Path, *, ray_defaults: bool) -> set[str]:
    """Package `src` with Ray's own code, as `ray job submit --working-dir` does; the files it holds."""
    try:
        from ray._private import ray_constants
        from ray._private.runtime_env.packaging import _zip_files
    except ImportError as e:  # private API: if Ray moves it, this test must follow
        pytest.fail(f"Ray's working_dir packaging moved: {e}")
    excludes = ray_constants.get_runtime_env_default_excludes() if ray_defaults else []
    _zip_files(str(src), excludes, str(out), include_gitignore=ray_defaults)
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_rayignore_keeps_outputs_git_venv_and_secrets_out_on_its_own(tmp_path: Path) -> None:
    src = tmp_path / "repo"
    kept = [
        "dvc.yaml", "params.yaml", "dvc.lock", ".dvc/config", ".dvcignore", "configs/imagenet-resnet50.yaml",
        "pipeline/__init__.py", "pipeline/data/ingest.py", "pipeline/models/resnet.py", "stages/train.py",
        "infra/ray/entrypoint.sh", "infra/mlflow/mlflow.env.example",
    ]
    dropped = [
        ".git/HEAD", ".git/objects/ab/cdef", ".venv/bin/python", "data/shards/train/00000.parquet",
        "data/synthetic/README.md", "models/resnet18/model.pt", "tune/best.json", "metrics/eval/resnet18.json",
        "plots/train/resnet18.csv", "reports/error_table.md", "ray_results/train-x/checkpoint_000001/x",
        "mlflow.db", "mlflow.db-wal", "mlartifacts/1/x", "mlruns/0/meta.yaml", ".dvc/cache/files/md5/ab/cd",
        ".dvc/tmp/rwlock", ".dvc/config.local", "pipeline/__pycache__/config.cpython-311.pyc",
        ".pytest_cache/v/x", ".ruff_cache/x", "infra/mlflow/mlflow.env", "infra/mlflow/k8s/mlflow-server.env",
        ".env",
    ]
    for rel in kept + dropped:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    shutil.copy(REPO / ".rayignore", src / ".rayignore")

    # No .gitignore and none of Ray's default excludes: .rayignore alone must do it.
    files = _ray_zip(src, tmp_path / "pkg.zip", ray_defaults=False)

    assert set(kept) <= files
    assert not set(dropped) & files


def test_the_repository_upload_is_small(tmp_path: Path) -> None:
    files = _ray_zip(REPO, tmp_path / "pkg.zip", ray_defaults=True)
    size = (tmp_path / "pkg.zip").stat().st_size
    assert size < 64 * 2**20, f"upload would be {size / 2**20:.0f} MiB (limit 512 MiB)"
    assert {"dvc.yaml", "params.yaml", ".dvc/config", ENTRYPOINT_SCRIPT, RUNTIME_ENV} <= files
    assert not {f for f in files if f.split("/")[0] in {".git", ".venv", "data", "models", "ray_results"}}


# --- no secrets in files ----------------------------------------------------------------------------------

# A key that holds a secret (its name ends with one of these words), assigned a value in any syntax:
# KEY=value, KEY: value, --key=value.
SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key))"
    r"[\"']?[ \t]*[:=][ \t]*(\S*)"
)
CREDENTIAL_IN_URI = re.compile(r"\b[a-z][\w+.-]*://[^\s/:@'\"]+:([^\s/@'\"]+)@")
LITERAL_PATTERNS = [
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub token
]
SENSITIVE_ENV = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|_KEY$|STORE_URI$|DATABASE_URI$")


def _is_reference(value: str) -> bool:
    """Not a literal secret: empty, an env reference or command substitution ($...), a template (<...>,
    {...}, %s), a path, a call in code (env.get(...)), or an ALL_CAPS placeholder."""
    v = value.strip("\"'`,;)")
    return (
        v == ""
        or v.startswith(("$", "<", "{", "(", "/", "%"))
        or re.match(r"^[\w.]+\(", v) is not None
        or (v.isupper() and v.replace("_", "").isalpha())
    )


def secret_literals(text: str) -> list[str]:
    found = [m.group(0) for p in LITERAL_PATTERNS for m in p.finditer(text)]
    # Values shorter than 6 characters are prose ("token: a stale one"), not credentials.
    found += [
        m.group(0) for m in SECRET_ASSIGNMENT.finditer(text)
        if len(m.group(2).strip("\"'`")) >= 6 and not _is_reference(m.group(2))
    ]
    found += [m.group(0) for m in CREDENTIAL_IN_URI.finditer(text) if not _is_reference(m.group(1))]
    return found


def test_the_secret_detector_catches_literals() -> None:
    for leak in [
        "MLFLOW_TRACKING_PASSWORD=hunter2hunter2",
        "  RAY_AUTH_TOKEN: 3f2a9c0d1e",
        "--from-literal=auth_token=abc123",
        "aws_secret_access_key = wJalrXUtnFEMI",
        "AKIAABCDEFGHIJKLMNOP",
        "postgresql+psycopg://mlflow:s3cr3t@db:5432/mlflow",
    ]:
        assert secret_literals(leak), leak
    for fine in [
        "MLFLOW_TRACKING_PASSWORD=$PIPELINE_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD=",
        "RAY_AUTH_TOKEN_PATH=/run/secrets/ray/auth_token",
        '--from-literal=auth_token="$(openssl rand -hex 32)"',
        "secretName: resnet-ray-token",
        "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB",
        "RAY_AUTH_MODE=token",
    ]:
        assert not secret_literals(fine), fine


def _text_files() -> list[Path]:
    paths = [REPO / ".rayignore", REPO / "docs/cluster.md", *INFRA.rglob("*")]
    return sorted(p for p in paths if p.is_file() and "__pycache__" not in p.parts)


def test_no_secret_literals_in_infra_or_docs() -> None:
    leaks = {p.relative_to(REPO).as_posix(): secret_literals(p.read_text()) for p in _text_files()}
    assert not {k: v for k, v in leaks.items() if v}


def test_kubernetes_credentials_come_from_secrets() -> None:
    assert not objects_of_kind("Secret"), "Secrets are created by hand (docs/cluster.md), never committed"
    for path, doc in k8s_objects():
        templates = []
        if doc["kind"] in {"Deployment", "StatefulSet"}:
            templates = [doc["spec"]["template"]]
        elif doc["kind"] == "RayCluster":
            templates = pod_templates(doc["spec"])
        elif doc["kind"] == "RayJob":
            templates = pod_templates(doc["spec"]["rayClusterSpec"])
        for template in templates:
            for c in containers(template):
                for e in c.get("env", []):
                    if SENSITIVE_ENV.search(e["name"]) and not e["name"].endswith(("_PATH", "_FILE")):
                        assert "value" not in e and "secretKeyRef" in e.get("valueFrom", {}), (path, e["name"])


def test_env_files_are_git_ignored_and_only_examples_committed() -> None:
    pathspec = pytest.importorskip("pathspec")
    ignore = pathspec.PathSpec.from_lines("gitwildmatch", (INFRA / "mlflow/.gitignore").read_text().splitlines())
    for secret_file in ["mlflow.env", "postgres.env", "k8s/mlflow-server.env", ".env"]:
        assert ignore.match_file(secret_file), secret_file
    examples = sorted((INFRA / "mlflow").rglob("*.env.example"))
    assert examples
    for example in examples:
        assert not ignore.match_file(example.relative_to(INFRA / "mlflow").as_posix())
        for line in example.read_text().splitlines():
            key, _, value = line.partition("=")
            if not line.startswith("#") and SENSITIVE_ENV.search(key):
                assert value == "", f"{example.name}: {key} must be left empty in the template"
    (compose,) = load_docs(INFRA / "mlflow/docker-compose.yaml")
    for service in compose["services"].values():
        for env_file in service.get("env_file", []):
            assert ignore.match_file(env_file) and (INFRA / "mlflow" / f"{env_file}.example").is_file()


# --- MLflow server ----------------------------------------------------------------------------------------


def _option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def test_mlflow_server_runs_basic_auth_without_plaintext_credentials() -> None:
    (deployment,) = objects_of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = [str(a) for a in container["args"]]
    assert args[:2] == ["mlflow", "server"]
    assert _option(args, "--app-name") == "basic-auth"
    assert "--serve-artifacts" in args
    assert _option(args, "--artifacts-destination").startswith("s3://")
    assert "--backend-store-uri" not in args, "the URI holds a password: pass it as MLFLOW_BACKEND_STORE_URI"
    env = {e["name"]: e for e in container["env"]}
    for name in ["MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"]:
        assert "secretKeyRef" in env[name]["valueFrom"], name

    (compose,) = load_docs(INFRA / "mlflow/docker-compose.yaml")
    command = [str(a) for a in compose["services"]["mlflow"]["command"]]
    assert _option(command, "--app-name") == "basic-auth" and "--backend-store-uri" not in command
    assert not secret_literals(" ".join(args + command))

    dockerfile = (INFRA / "mlflow/Dockerfile").read_text()
    assert "mlflow[auth]==" in dockerfile, "basic-auth needs the auth extra (Flask-WTF)"
    assert "mlflow_entrypoint.py" in dockerfile


def _run_mlflow_entrypoint(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    probe = (
        "import json, os, stat; p = os.environ['MLFLOW_AUTH_CONFIG_PATH']; "
        "print(json.dumps({'uri': os.environ['MLFLOW_BACKEND_STORE_URI'], 'ini': p, "
        "'mode': stat.S_IMODE(os.stat(p).st_mode)}))"
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp_path), **env_extra}
    return subprocess.run(
        [sys.executable, str(INFRA / "mlflow/mlflow_entrypoint.py"), sys.executable, "-c", probe],
        env=env, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.subprocess
def test_mlflow_entrypoint_builds_uris_and_a_private_auth_config(tmp_path: Path) -> None:
    password = "p@ss:w/rd%"  # every character that breaks a URI or configparser
    out = _run_mlflow_entrypoint(tmp_path, {"POSTGRES_PASSWORD": password, "POSTGRES_HOST": "db"})

    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["uri"] == "postgresql+psycopg://mlflow:p%40ss%3Aw%2Frd%25@db:5432/mlflow"
    assert result["mode"] == 0o600
    # Read the way MLflow reads it (mlflow.server.auth.config: ConfigParser, with interpolation).
    config = configparser.ConfigParser()
    config.read(result["ini"])
    assert config["mlflow"]["database_uri"] == "postgresql+psycopg://mlflow:p%40ss%3Aw%2Frd%25@db:5432/mlflow_auth"
    assert config["mlflow"]["default_permission"] == "READ"


@pytest.mark.subprocess
def test_mlflow_entrypoint_refuses_to_start_without_a_database(tmp_path: Path) -> None:
    out = _run_mlflow_entrypoint(tmp_path, {})
    assert out.returncode != 0
    assert "MLFLOW_BACKEND_STORE_URI" in out.stderr


@pytest.mark.subprocess
def test_entrypoint_never_logs_uri_userinfo(tmp_path: Path) -> None:
    _stub_dvc(tmp_path / "bin", tmp_path / "dvc.log")
    src = _uploaded_copy(tmp_path)
    out = _run_entrypoint(src, tmp_path, {"MLFLOW_TRACKING_URI": "https://bob:p@ss/w0rd@mlflow.example:5000/x",
                                          "RAY_ADDRESS": "http://ray:t0ken@127.0.0.1:1"})
    assert out.returncode == 0, out.stdout + out.stderr
    log = out.stdout + out.stderr
    assert "MLflow: https://***@mlflow.example:5000/x" in log
    assert "RAY_ADDRESS=http://***@127.0.0.1:1" in log
    for secret in ("bob", "p@ss", "w0rd", "t0ken"):
        assert secret not in log


def test_every_documented_token_file_is_created_private() -> None:
    """A token written under the usual umask is 0644 (measured: `ray get-auth-token --generate` makes
    ~/.ray/auth_token 644 under umask 022, 600 under 077): every place that creates one sets umask 077."""
    creators = re.compile(r"get-auth-token --generate|>\s*\S*auth_token\b")
    found = []
    for path in [REPO / "docs/cluster.md", REPO / "README.md", *INFRA.rglob("*")]:
        if not path.is_file() or path.suffix not in (".md", ".yaml", ".sh", ""):
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if creators.search(line):
                found.append(path.name)
                context = "\n".join(lines[max(0, i - 3): i + 1])
                assert "umask 077" in context, f"{path.relative_to(REPO)}:{i + 1} creates a token without umask 077"
    assert "cluster.md" in found and "cluster-aws.yaml" in found
