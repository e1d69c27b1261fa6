"""Every MLflow call of the project lives here.

Runs are addressed by explicit run ids through `MlflowClient` rather than MLflow's process-global
"active run": stages, Ray workers and Tune trials live in different processes. Within one training run
only the driver and Ray Train's rank 0 write (SQLite allows one writer; MLflow's SQLite
engine waits up to 20 s on a lock, and our writes are single small batches, so the two never collide
for long); several machines, or several stages at once, need `mlflow server`
(`infra/mlflow/local/serve.sh`).

Credentials: a tracking server's user and password come only from `MLFLOW_TRACKING_USERNAME` /
`MLFLOW_TRACKING_PASSWORD`, which MLflow's REST client reads itself. Nothing here reads, logs, tags or
stores them; nor is the tracking URI (which may embed a database password) logged or tagged.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# All runs of one `dvc repro` share this tag; set PIPELINE_RUN_GROUP to name the group yourself.
GROUP_TAG = "pipeline.run_group"
# The group's parent run (named after the group) carries this tag; every stage's top-level run is its child, so
# the UI shows one expandable row per repro.
GROUP_PARENT_TAG = "pipeline.group_parent"
# MLflow 3's UI picks an experiment's landing page from this tag: "custom_model_development" opens the runs
# table, "genai_development" (or no tag) the GenAI overview of traces.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow stores at most 36 characters of a dataset digest (MAX_DATASET_DIGEST_SIZE); the fingerprint is a
# 64-digit sha256, so the digest is its prefix and the dataset's profile holds it whole.
DATASET_DIGEST_CHARS = 36


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


def _existing_store(what: str) -> None:
    """Readers (predict, evaluate of a `models:/` URI) must not create a store: opening a missing SQLite file
    would leave an empty mlflow.db behind and then report the model as "not found"."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/mlflow.db or sqlite:///relative.db
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no MLflow store at {path} (set MLFLOW_TRACKING_URI to the "
                                    "registry that holds it)")


def git_commit() -> str:
    """HEAD of the repository; on a cluster (uploaded without .git) the entrypoint exports PIPELINE_GIT_COMMIT."""
    if os.environ.get("PIPELINE_GIT_COMMIT"):
        return os.environ["PIPELINE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_group() -> str:
    """The id shared by every run of one pipeline execution (README: 'finding the runs of one repro'):
    PIPELINE_RUN_GROUP, else the commit, with the experiment's name under `dvc exp run -n NAME`."""
    if os.environ.get("PIPELINE_RUN_GROUP"):
        return os.environ["PIPELINE_RUN_GROUP"]
    commit = f"commit-{git_commit()[:12]}"
    exp = os.environ.get("DVC_EXP_NAME")  # set by DVC for the stages of a named experiment
    return f"{commit}-exp-{exp}" if exp else commit


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
    """The experiment's id, created if needed and marked as model training (an existing experiment that has
    no kind yet gets it too; one a user set is kept)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return str(client.create_experiment(name, artifact_location=_sqlite_artifact_location(name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return str(exp.experiment_id)


def _sqlite_artifact_location(experiment: str) -> str | None:
    """A SQLite store keeps artifacts under ./mlruns of whichever directory first created the experiment
    (a Ray worker's, a test's); pin them beside the database file instead: `<db folder>/mlruns/<experiment>`
    (the repository's git-ignored mlruns/ for the embedded store). Servers choose their own (None)."""
    import re

    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    db = db if db.is_absolute() else Path.cwd() / db
    return str(db.parent / "mlruns" / re.sub(r"[^A-Za-z0-9._-]", "_", experiment))


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


def group_run(experiment: str) -> str:
    """The parent run of this pipeline execution's runs (one per run group, named after it), created on first
    use. It holds no metrics: it is the row under which the UI nests the stages' runs."""
    client = _client()
    exp_id = _experiment_id(client, experiment)
    group = run_group()
    found = client.search_runs([exp_id], filter_string=f"tags.`{GROUP_PARENT_TAG}` = '{group}'", max_results=1,
                               order_by=["attributes.start_time ASC"])
    if found:
        return str(found[0].info.run_id)
    run = client.create_run(exp_id, run_name=group, tags={
        "mlflow.runName": group, GROUP_TAG: group, GROUP_PARENT_TAG: group, "git.commit": git_commit(),
        "mlflow.note.content": f"The runs of one pipeline execution (run group `{group}`): tune, train@ARCH, "
                               "evaluate@ARCH, degradation, register."})
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def start_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume_key: str | None = None,
) -> str:
    """Create a run (or reopen the one tagged `resume.key=resume_key`) and return its id. Without
    `parent_run_id` the run is a child of this execution's `group_run`; a reopened run moves under it."""
    client = _client()
    parent_run_id = parent_run_id or group_run(experiment)
    if resume_key:
        existing = find_run(experiment, "resume.key", resume_key)
        if existing:
            client.update_run(existing, status="RUNNING")
            client.set_tag(existing, "mlflow.parentRunId", parent_run_id)
            client.set_tag(existing, GROUP_TAG, run_group())
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


def log_dataset(run_id: str, name: str, fingerprint: str, source: str, context: str,
                profile: Mapping[str, Any] | None = None) -> None:
    """Log the shards as the run's dataset input (the run's Datasets column): `name`, digest = the data
    fingerprint (its first DATASET_DIGEST_CHARS digits), `source` = where the shards are, `context` (train,
    tune, eval) as MLflow's context tag. Logging the same dataset again (a resumed run) is a no-op."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    client = _client()
    digest = str(fingerprint)[:DATASET_DIGEST_CHARS]
    for existing in client.get_run(run_id).inputs.dataset_inputs:
        ctx = {t.key: t.value for t in existing.tags}.get("mlflow.data.context")
        if existing.dataset.digest == digest and existing.dataset.name == name and ctx == context:
            return
    dataset = Dataset(name=name, digest=digest, source_type="local" if "://" not in source else source.split(":")[0],
                      source=json.dumps({"uri": source}),
                      profile=json.dumps({"fingerprint": str(fingerprint), **dict(profile or {})}))
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])


def log_shards_input(run_id: str, manifest: Mapping[str, Any], shards_dir: str | Path, context: str) -> None:
    """`log_dataset` for a prepared shards folder and its manifest."""
    from pipeline.data.shards import dataset_name

    splits = manifest.get("splits", {})
    log_dataset(run_id, dataset_name(dict(manifest)), str(manifest["fingerprint"]), str(shards_dir), context,
                profile={"num_classes": manifest.get("num_classes"),
                         "train_images": splits.get("train", {}).get("n_images"),
                         "minival_images": splits.get("minival", {}).get("n_images", 0),
                         "val_images": splits.get("val", {}).get("n_images")})


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


def log_config(run_id: str, config: Mapping[str, Any], artifact_file: str = "config/params.yaml") -> None:
    """The resolved parameters (`Params.model_dump(mode="json")`) as a YAML artifact of the run: the
    flat `params` of a run are truncated strings, this file is the config that actually ran."""
    _client().log_dict(run_id, dict(config), artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    _client().log_text(run_id, text, artifact_file)


@contextmanager
def system_metrics(
    run_id: str | None, sampling_interval_s: float = 10.0, node_id: str | None = None
) -> Iterator[None]:
    """Log this machine's utilisation to `run_id` while the block runs: `system/cpu_utilization_percentage`,
    `system/system_memory_usage_percentage`, disk and network, and `system/gpu_{i}_*` when `nvidia-ml-py`
    is installed and a GPU is visible. One sample every `sampling_interval_s` seconds (MLflow's
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides it); steps continue after a resumed run's.

    MLflow's own `start_run(log_system_metrics=True)` needs the process-global active run; its
    `SystemMetricsMonitor` takes the run id, so it fits our explicit-run-id style and never touches the
    fluent run state. The monitor stops by itself if the run ends. Monitoring never fails the block: a
    monitor that cannot start is a warning. `run_id=None` does nothing.

        with tracking.system_metrics(run_id):
            outcome = run(trainer)   # trainer.fit() in the driver
    """
    monitor = None
    if run_id:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            _client()
            monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval_s, resume_logging=True,
                                           node_id=node_id, tracking_uri=tracking_uri())
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - metrics are an aid, never a reason to stop training
            _log.warning("system metrics are not logged: %s", exc)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            _stop_monitor(monitor)


def _stop_monitor(monitor: Any) -> None:
    try:
        monitor.finish()
        # MLflow's loop exits on shutdown without publishing the samples taken since its last publish, so
        # a block shorter than one interval would log nothing: publish what is left.
        leftover = monitor.aggregate_metrics()
        if leftover:
            monitor.publish_metrics(leftover)
            monitor.mlflow_logger.flush()
    except Exception as exc:  # noqa: BLE001
        _log.warning("system metrics: final flush failed: %s", exc)


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
    registered_description: str | None = None,
    dynamic_spatial: bool = True,
) -> str:
    """Log `model` as pt2 with a pyfunc signature into run `run_id` and register it from there (the version's
    source run); returns the new version number.

    `example` is a numpy batch of >= 2 images: a batch of 1 would specialise the exported batch
    dimension to 1, so the stored model would refuse other batch sizes. A numpy example
    (not a tensor) keeps the pyfunc flavour, which `mlflow models serve` needs. The stored model is the
    exported program and its weights, with no bundled code (`code: null`): it loads with
    `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`, where MLflow first checks that the pt2 archive holds no
    pickle payload (tests/test_mlflow.py).

    `registered_description` describes the registered model itself; it is set only when this call creates it.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # log_model runs a pip dry-run to pin requirements; offline it would fail.
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    if example.ndim < 1 or example.shape[0] < 2:
        raise ValueError("the input example needs a batch of at least 2 (dynamic batch dimension)")
    client = _client()
    with torch.no_grad():
        out = model(torch.from_numpy(example)).numpy()
    # -1 marks a dimension dynamic in the signature, which also makes the pt2 export dynamic (MLflow exports
    # with Dim.AUTO there). Images (N, C, H, W): the batch and the spatial dimensions, so a FixRes-style test
    # resolution or a client's own image size reaches the network (global average pooling takes any size);
    # only the channel count is fixed. The specs are unnamed: a request is then a plain array,
    # {"inputs": [[[[...]]]]}.
    in_shape = (-1, example.shape[1], -1, -1) if dynamic_spatial and example.ndim == 4 else (-1, *example.shape[1:])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(example.dtype), in_shape)]),
        outputs=Schema([TensorSpec(np.dtype(out.dtype), (-1, *out.shape[1:]))]),
    )
    # log_model logs into the fluent active run; leaving the `with` ends the run: give it back the status it
    # had (RUNNING: the caller still writes to it and ends it; FINISHED: a training run the model is added to).
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id), _size_oblivious_export():
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            signature=signature,
            serialization_format="pt2",
            metadata=dict(metadata),
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    client.update_run(run_id, status=status)
    try:
        client.get_registered_model(registered_name)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException for "not found"
        client.create_registered_model(registered_name, description=registered_description)
    # model_id links the version to the logged model; a tracking server refuses a models:/m-... source without it.
    mv = client.create_model_version(registered_name, info.model_uri, run_id=run_id, description=description,
                                     tags={k: str(v) for k, v in version_tags.items()}, model_id=info.model_id)
    _wait_ready(client, registered_name, mv.version)
    return str(mv.version)


def _size_oblivious_export() -> Any:
    """torch.export specialises any size that is 0 or 1 in the example: a ResNet's last stage is 1x1 at 32 px
    (and 7x7 at 224 px), so a dynamic height exported from a 32-px example was guarded to <= 32 px, and one from a
    64-px example refused every input under 33 px ("Guard failed: ... != 1", seen on torch 2.14). Size-oblivious
    tracing does not specialise on 0/1, so the program accepts every size the network does (1x1 included)."""
    import contextlib

    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # another torch layout: export as MLflow does by default
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _wait_ready(client: Any, name: str, version: str, timeout_s: float = 60) -> None:
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)
    raise TimeoutError(f"model {name} v{version} not READY after {timeout_s}s")


def set_version_tags(name: str, version: str, tags: Mapping[str, str]) -> None:
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))


def model_versions(name: str) -> list[Any]:
    """Every version of registered model `name`, oldest first."""
    versions = _client().search_model_versions(f"name = '{name}'")
    return sorted(versions, key=lambda v: int(v.version))


def model_metadata(uri: str) -> dict[str, Any]:
    """The `metadata` a logged model carries (classes, class names, eval transform, ...), read from its
    MLmodel file without loading the weights."""
    import mlflow.models

    _existing_store(uri)
    _client()
    return dict(mlflow.models.get_model_info(uri).metadata or {})


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


class ModelRefused(ValueError):
    """A registry model that would run code on load (pickle, bundled code) and was not allowed to."""


# MLflow reads this at load time; its default (true) unpickles whatever a registry holds.
_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def load_registered_model(uri: str, *, allow_pickle: bool = False) -> Any:
    """Load a `models:/...` (or `runs:/...`) URI as a torch module (pt2 programs come back as a callable module).

    A shared registry is input we did not write: unpickling one of its models runs any `__reduce__` payload it
    holds, and bundled code (`code_paths`) is put on sys.path. So by default only a pickle-free model loads: the
    `pytorch` flavour stored as a pt2 program (what `log_and_register_model` writes), with no bundled code, and
    MLflow's own check that the pt2 archive holds no pickle record runs with pickle refused. Anything else raises
    ModelRefused naming the URI. `allow_pickle=True` (`--allow-pickle`) loads it anyway: for trusted registries.
    """
    import mlflow.artifacts
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    _existing_store(uri)
    _client()
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    if not allow_pickle:
        flavors = Model.load(str(local / "MLmodel")).flavors
        conf = flavors.get("pytorch")
        hint = "pass --allow-pickle (allow_pickle=True) only if you trust this registry"
        if conf is None:
            raise ModelRefused(f"{uri}: not a PyTorch model (flavours {sorted(flavors)}); {hint}")
        if conf.get("code"):
            raise ModelRefused(f"{uri}: bundles code ({conf['code']}) that loading would import; {hint}")
        data = local / str(conf.get("model_data", "data"))
        if not (data / "model.pt2").is_file() or (data / "model.pth").exists():
            raise ModelRefused(f"{uri}: stored as a pickle (no pt2 program in {data.name}/), which runs code on "
                               f"load; re-log it with serialization_format='pt2', or {hint}")
    saved = os.environ.get(_PICKLE_ENV)
    if not allow_pickle:
        os.environ[_PICKLE_ENV] = "false"
    try:
        return mlflow.pytorch.load_model(str(local))
    except MlflowException as exc:
        if allow_pickle or "pickle" not in str(exc).lower():
            raise
        raise ModelRefused(f"{uri}: {str(exc).splitlines()[0]}") from None
    finally:
        if not allow_pickle:
            if saved is None:
                os.environ.pop(_PICKLE_ENV, None)
            else:
                os.environ[_PICKLE_ENV] = saved


def experiment_runs(experiment: str, filter_string: str = "", *, groups: bool = False) -> list[Any]:
    """Every run of `experiment` (newest first), optionally filtered (MLflow search syntax); the run groups'
    parent runs (`group_run`) only with `groups=True`."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=filter_string,
                              order_by=["attributes.start_time DESC"])
    return [r for r in runs if groups or GROUP_PARENT_TAG not in r.data.tags]


def get_run(run_id: str) -> Any | None:
    """The run, or None when this store has no such run."""
    try:
        return _client().get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own RestException / MlflowException for "not found"
        return None


def get_experiment(name: str) -> Any | None:
    return _client().get_experiment_by_name(name)
