"""Every MLflow call of the project lives here.

Runs are addressed by explicit run ids through `MlflowClient` rather than MLflow's process-global
"active run": stages, Ray workers and Tune trials live in different processes, and only one process at
a time writes to the embedded SQLite store (PITFALLS.md: SQLite allows one writer).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# All runs of one `dvc repro` share this tag; set PIPELINE_RUN_GROUP to name the group yourself.
GROUP_TAG = "pipeline.run_group"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` wins; otherwise the embedded store at the repository root (absolute, so Ray
    workers whose working directory differs still find it)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def _client() -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_group() -> str:
    """The id shared by every run of one pipeline execution (README: 'finding the runs of one repro')."""
    return os.environ.get("PIPELINE_RUN_GROUP") or f"commit-{git_commit()[:12]}"


def base_tags(stage: str, params_digest: str, data_fingerprint: str | None) -> dict[str, str]:
    tags = {
        "git.commit": git_commit(),
        "dvc.stage": stage,
        "params.digest": params_digest,
        GROUP_TAG: run_group(),
    }
    if data_fingerprint:
        tags["data.fingerprint"] = data_fingerprint
    return tags


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(name))


def find_run(experiment: str, tag: str, value: str) -> str | None:
    """The newest run of `experiment` whose tag `tag` equals `value` (used to resume a run, not fork it)."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def start_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume_key: str | None = None,
) -> str:
    """Create a run (or reopen the one tagged `resume.key=resume_key`) and return its id."""
    client = _client()
    if resume_key:
        existing = find_run(experiment, "resume.key", resume_key)
        if existing:
            client.update_run(existing, status="RUNNING")
            return existing
    all_tags = {"mlflow.runName": run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resume_key:
        all_tags["resume.key"] = resume_key
    run = client.create_run(_experiment_id(client, experiment), tags=all_tags, run_name=run_name)
    run_id = str(run.info.run_id)
    if params:
        log_params(run_id, params)
    return run_id


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client()
    existing = client.get_run(run_id).data.params
    # MLflow refuses to change a logged param; a resumed run logs only what is new.
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    _client().log_batch(run_id, metrics=items)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    _client().log_artifact(run_id, str(path), artifact_path)


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    client = _client()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


def run_metrics(run_id: str) -> dict[str, float]:
    return dict(_client().get_run(run_id).data.metrics)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in _client().get_metric_history(run_id, key)]


def child_runs(parent_run_id: str, experiment: str) -> list[Any]:
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    return list(
        client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    )


# --- model registry -------------------------------------------------------------------------------------


def log_and_register_model(
    run_id: str,
    model: Any,
    example: Any,
    registered_name: str,
    description: str,
    version_tags: Mapping[str, str],
    metadata: Mapping[str, Any],
) -> str:
    """Log `model` as pt2 with a pyfunc signature and register it; returns the new version number.

    `example` is a numpy batch of >= 2 images: a batch of 1 would specialise the exported batch
    dimension to 1 (PITFALLS.md), so the stored model would refuse other batch sizes.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # log_model runs a pip dry-run to pin requirements; offline it would fail (PITFALLS.md).
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    if example.shape[0] < 2:
        raise ValueError("the input example needs a batch of at least 2 (dynamic batch dimension)")
    client = _client()
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    # -1 marks the batch dimension dynamic in the signature, which also makes the pt2 export dynamic.
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(example.dtype), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(out.dtype), (-1, *out.shape[1:]))]),
    )
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            signature=signature,
            serialization_format="pt2",
            metadata=dict(metadata),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    try:
        client.get_registered_model(registered_name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException for "not found"
        client.create_registered_model(registered_name)
    mv = client.create_model_version(registered_name, info.model_uri, run_id=run_id, description=description,
                                     tags=dict(version_tags))
    _wait_ready(client, registered_name, mv.version)
    return str(mv.version)


def _wait_ready(client: Any, name: str, version: str, timeout_s: float = 60) -> None:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"model {name} v{version} not READY after {timeout_s}s")


def alias_version(name: str, alias: str) -> Any | None:
    """The version carrying `alias`, or None."""
    try:
        return _client().get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - not found
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, version)


def get_model_version(name: str, version: str) -> Any:
    return _client().get_model_version(name, version)


def load_registered_model(uri: str) -> Any:
    """Load a `models:/...` URI as a torch module (pt2 programs come back as a callable module)."""
    import mlflow.pytorch

    _client()
    return mlflow.pytorch.load_model(uri)


def experiment_runs(experiment: str, filter_string: str = "") -> list[Any]:
    """Every run of `experiment` (newest first), optionally filtered (MLflow search syntax)."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string=filter_string,
                                   order_by=["attributes.start_time DESC"]))
