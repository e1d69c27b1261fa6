"""Driver side of training: start/join Ray, build the TorchTrainer (Train V2), run it, export the model."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.cluster import release_request, wait_for_resources
from pipeline.config import Params, choose_decode, with_absolute_paths, worker_decode_blockers
from pipeline.data.ingest import TASK_CPUS, train_dataset, val_dataset
from pipeline.data.shards import check_nodes_see, read_manifest, shard_files
from pipeline.models.pretrained import require_weights
from pipeline.runtime import (
    LOCAL_DATA_CPUS,
    absolute_storage,
    clean_stale_temps,
    init_ray,
    join,
    output_lock,
    ray_storage,
    worker_threads,
    write_csv,
    write_json,
)
from pipeline.training.checkpoint import export_model_dir, load_train_state
from pipeline.training.errors import DeterministicFailure, TrainingDiverged, deterministic_cause
from pipeline.training.identity import train_run_name
from pipeline.training.loop import GradStats, Job, check_grad_stats, train_loop_per_worker
from pipeline.training.tuned import tuned_lr_for

# Ray stays a function-level import (where the trainer is built and run): importing this module loads none of it.


@dataclass
class Outcome:
    state: dict[str, Any]  # the last training state (see loop._report)
    history: list[dict[str, Any]]
    path: str | None


def train_bundles(p: Params, num_workers: int) -> list[dict[str, float]]:
    """The resource shapes a training run asks for: one per worker (its CPUs, and a GPU with train.use_gpu),
    plus one decode task's CPUs for Ray Data (a run whose workers hold every CPU never starts reading)."""
    tp = p.train
    worker = {"CPU": tp.cpus_per_worker, **({"GPU": 1.0} if tp.use_gpu else {})}
    return [dict(worker) for _ in range(num_workers)] + [{"CPU": TASK_CPUS}]


def build_trainer(
    job: Job, p: Params, *, name: str, num_workers: int, storage_path: str, callbacks: list[Any] | None = None,
) -> Any:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.retry import StopOnDeterministicFailure  # imports Ray

    tp = p.train
    if num_workers == 0:  # in-process: nothing persists a reported checkpoint, the loop rewrites one in place
        job.checkpoint_dir = job.checkpoint_dir or tempfile.mkdtemp(prefix="resnet-ckpt-")
    else:
        wait_for_resources(
            train_bundles(p, num_workers), what=f"training {job.arch}",
            keys="train.num_workers, train.cpus_per_worker or train.use_gpu",
            timeout_s=p.cluster.wait_for_resources_s,
        )
    check_data_cpus(num_workers, tp.cpus_per_worker)
    # job.params keep train.decode as written (auto): the run's recorded config; the workers read job.decode.
    job.decode = resolve_decode(p, num_workers).train.decode
    ds = train_dataset(job.train_files, crop=tp.train_crop_size, min_scale=tp.train_crop_min_scale, seed=p.seed,
                       decode=job.decode, recipe=tp, epochs=job.epochs, n_rows=job.n_train)
    # Validation is decoded by Ray Data tasks too, not on the training thread; padded so every rank gets the
    # same number of rows (see val_dataset).
    val = val_dataset(job.val_files, resize=tp.val_resize_size, crop=tp.val_crop_size, n_images=job.n_val,
                      pad_to_multiple=max(num_workers, 1), keep_keys=False)
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=tp.use_gpu,
        resources_per_worker=None if num_workers == 0 else {"CPU": tp.cpus_per_worker},
    )
    # An S3 endpoint from AWS_ENDPOINT_URL reaches Ray only as an explicit filesystem (pipeline.runtime).
    ray_path, ray_fs = ray_storage(absolute_storage(storage_path))
    run_config = RunConfig(
        name=name,
        storage_path=ray_path,
        storage_filesystem=ray_fs,
        # max_failures counts worker and node losses: a failure that a retry cannot fix (divergence, refused
        # data) stops the run at once (pipeline.training.retry).
        failure_config=FailureConfig(max_failures=tp.max_failures),
        # Keep the last two: the newest can be half-uploaded when a node dies.
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=[StopOnDeterministicFailure(), *(callbacks or [])],
        worker_runtime_env=_worker_env(),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_config(),
        scaling_config=scaling,
        run_config=run_config,
        datasets={"train": ds, "val": val},
        # One worker: no split. A split dataset streams through a SplitCoordinator actor, whose scheduling loop
        # ran at ~12% of a core here (top, 2-core machine) to hand blocks to its single consumer; unsplit, the
        # worker runs Ray Data's executor itself and every epoch still re-executes (and reshuffles) the dataset.
        dataset_config=DataConfig(datasets_to_split="all" if num_workers > 1 else [],
                                  execution_options=_ingest_options(tp)),
    )


def _ingest_options(tp: Any) -> dict[str, Any] | None:
    """Train replaces each dataset's execution options with its defaults (DataConfig.default_ingest_options),
    which dropped train_dataset's `preserve_order` for train.deterministic: two deterministic fits with a Ray Train
    worker then ended 15.2 apart in max abs weight (bench/bench_determinism.py, before this). Deterministic runs
    hand Train the defaults with the order preserved for the train dataset."""
    if not tp.deterministic:
        return None
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return {"train": opts}


def check_data_cpus(num_workers: int, cpus_per_worker: float) -> None:
    """Fail fast, not hang: training workers that hold every CPU of the cluster leave Ray Data none, and ingest
    never starts (the run would wait forever on "Active & requested resources: 1/0 CPU"). Read after
    `wait_for_resources`, so an autoscaling cluster's nodes are counted."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    left = total - num_workers * cpus_per_worker
    if num_workers > 0 and left < TASK_CPUS:
        raise ValueError(
            f"train.num_workers={num_workers} x train.cpus_per_worker={cpus_per_worker:g} takes {total - left:g} of "
            f"the cluster's {total:g} CPUs and leaves {left:g} for Ray Data's decode tasks (each needs {TASK_CPUS:g}): "
            "lower train.cpus_per_worker or train.num_workers, or add CPUs"
        )


def resolve_decode(p: Params, num_workers: int) -> Params:
    """`p` with train.decode `auto` resolved for this cluster (pipeline.config.choose_decode) and the choice
    printed in one line; any other value as it is. The CPUs per GPU counted are those Ray Data's decode tasks can
    have: the cluster's CPUs minus the training workers' reservations, per worker (after `wait_for_resources`)."""
    tp = p.train
    if tp.decode != "auto":
        return p
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    workers = max(num_workers, 1)
    left = max(total - num_workers * tp.cpus_per_worker, 0.0) / workers
    choice, why = choose_decode("auto", use_gpu=tp.use_gpu, decode_cpus_per_gpu=round(left, 2),
                                blockers=worker_decode_blockers(tp))
    print(f"[train] train.decode: auto -> {choice}: {why}", flush=True)
    return p.model_copy(update={"train": tp.model_copy(update={"decode": choice})})


def _worker_env() -> dict[str, Any]:
    """Rank 0 logs to MLflow: give the workers the driver's store when it is the embedded SQLite file. They
    import `pipeline` from the Ray job's working_dir, which is not the driver's folder when the cluster
    entrypoint runs in a PIPELINE_WORKSPACE, so they would derive another file ("Run ... not found"). A
    server URI is not sent: it may embed a password, and the nodes' environment sets it."""
    uri = tracking.tracking_uri()
    return {"env_vars": {"MLFLOW_TRACKING_URI": uri}} if uri.startswith("sqlite:") else {}


def fit(trainer: Any) -> Any:
    """`trainer.fit()`, with a failure that a retry cannot fix (pipeline.training.errors) raised as itself, in one
    line naming the arch and lr, not as Ray Train's ControllerError/WorkerGroupError around a remote traceback
    (Ray Train's controller log keeps that); any other failure propagates as Ray raised it."""
    try:
        result = trainer.fit()
    except Exception as exc:
        cause = deterministic_cause(exc)
        if cause is None:
            raise
        raise _one_line(cause, getattr(trainer, "train_loop_config", None) or {}) from None
    if result.error is not None:
        cause = deterministic_cause(result.error)
        if cause is None:
            raise result.error
        raise _one_line(cause, getattr(trainer, "train_loop_config", None) or {}) from None
    return result


def _one_line(cause: BaseException, config: dict[str, Any]) -> BaseException:
    """`cause` with its first line only, prefixed with the arch and lr unless it names them (the divergence
    watch's does, with the epoch); the same type, so callers catch what they caught before."""
    text = str(cause).strip().splitlines()
    msg = text[0] if text else type(cause).__name__
    if not isinstance(cause, TrainingDiverged) and "arch" in config:
        msg = f"training {config['arch']} at lr {float(config.get('lr', math.nan)):.4g} stopped, not retried: {msg}"
    try:
        out = type(cause)(msg)
    except Exception:  # noqa: BLE001 - a type whose constructor wants more than a message: raise it as it came
        return cause.with_traceback(None)
    return out


def run(trainer: Any) -> Outcome:
    result = fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = load_train_state(d)
    return Outcome(state=state, history=list(state["history"]), path=result.path)


def train_split_names(p: Params, manifest: dict[str, Any]) -> tuple[str, ...]:
    """The splits a final training run (train@ARCH, degradation) reads: the full train set, i.e. train plus the
    minival split that tune held out, unless train.include_minival is false. A manifest without a minival
    split (nothing carved) is just its train split."""
    with_minival = p.train.include_minival and int((manifest["splits"].get("minival") or {}).get("n_images", 0)) > 0
    return ("train", "minival") if with_minival else ("train",)


def make_job(
    p: Params, arch: str, lr: float, warmup: int, epochs: int, mlflow_run_id: str | None, train_fraction: float = 1.0,
    *, train_splits: tuple[str, ...] | None = None, val_split: str = "val", grad_stats: GradStats | None = None,
) -> Job:
    """Everything a run needs from the shards: file lists checked at start-up for what is cheap (sizes and
    Parquet footers of the files this run reads; every byte is hashed when read), counts and the class list.

    `train_splits` (default `train_split_names`) are read for training, `train_fraction` of the first one's
    shards; `val_split` is what the run validates on: "val" for final training, "minival" for tune trials,
    which must never open a val shard (tests/test_tuning.py records every shard read). `grad_stats`: the
    measurement train.log_grad_stats logs (pipeline.analysis.measure.gradient_stats), required when it is on."""
    check_grad_stats(p, grad_stats)
    manifest = read_manifest(p.data.shards_dir)
    check_nodes_see(p.data.shards_dir, str(manifest["fingerprint"]))  # multi-node: every node, the same data
    splits = train_split_names(p, manifest) if train_splits is None else train_splits
    train_files: list[str] = []
    n_train = 0
    for i, split in enumerate(splits):
        rows = [int(s["rows"]) for s in manifest["splits"][split]["shards"]]
        # A fraction of the shards is a random subset of images: prepare shuffles rows across shards.
        keep = max(1, math.ceil(train_fraction * len(rows))) if i == 0 else len(rows)
        train_files += shard_files(p.data.shards_dir, split, verify=True, limit=keep)  # checks only what is read
        n_train += sum(rows[:keep])
    return Job(
        params=p.model_dump(mode="json"),
        arch=arch,
        lr=lr,
        lr_warmup_epochs=warmup,
        epochs=epochs,
        num_classes=int(manifest["num_classes"]),
        classes=[c["wnid"] for c in manifest["classes"]],
        class_names={c["wnid"]: c["name"] for c in manifest["classes"]},
        n_train=n_train,
        n_val=int(manifest["splits"][val_split]["n_images"]),
        train_files=train_files,
        val_files=shard_files(p.data.shards_dir, val_split, verify=True),
        data_fingerprint=str(manifest["fingerprint"]),
        git_commit=tracking.git_commit(),
        mlflow_run_id=mlflow_run_id,
        threads=worker_threads(p.train.cpus_per_worker),
        pretrained_path=pretrained_weights(p, arch),
        grad_stats=grad_stats,
    )


def pretrained_weights(p: Params, arch: str) -> str | None:
    """train.pretrained -> the weights file every worker loads; a clear error before Ray starts when absent."""
    if p.train.pretrained is None:
        return None
    where = None if p.train.pretrained == "torchvision" else p.train.pretrained
    return str(require_weights(arch, where).resolve())


def tuned_hparams(p: Params, best_path: str | Path | None, arch: str) -> tuple[float, int, dict[str, Any]]:
    """(lr, lr_warmup_epochs, where they came from). With train.use_tuned and tune/best.json present: the entry
    of `arch` or of the tuned arch of its kind nearest in depth (pipeline.archs.lr_source_arch), its lr
    rescaled from the trial batch to train.batch_size by the linear scaling rule; otherwise the params' own."""
    if p.train.use_tuned and best_path and Path(best_path).is_file():
        return tuned_lr_for(Path(best_path), arch, p.train.batch_size, p.train.epochs_for(arch),
                            recipe_warmup=p.train.lr_warmup_epochs)
    why = "train.use_tuned is false" if not p.train.use_tuned else "no tune/best.json"
    return p.train.lr, p.train.lr_warmup_epochs, {"from": "params", "why": why, "lr": p.train.lr,
                                                  "batch_size": p.train.batch_size}


class TrainingRefused(DeterministicFailure, ValueError):
    """A run that would train nothing, or nothing meaningful, refused before it starts."""


def check_trainable(*, n_train: int, num_classes: int, batch_size: int, num_workers: int, epochs: int) -> None:
    """Refuse a run that would exit 0 having learned nothing: the loop drops the last partial batch (equal steps
    on every rank), so a per-worker batch larger than the rows a worker gets trains zero real steps; one class
    makes every error 0%; zero epochs export the initial weights."""
    world = max(num_workers, 1)
    per_worker_batch, rows_per_worker = batch_size // world, n_train // world
    if epochs < 1:
        raise TrainingRefused(f"train.epochs={epochs}: at least one epoch is needed")
    if num_classes < 2:
        raise TrainingRefused(f"the shards hold {num_classes} class(es): classification needs at least 2")
    if per_worker_batch < 1:
        raise TrainingRefused(f"train.batch_size={batch_size} is smaller than train.num_workers={num_workers}: "
                              "each worker's batch would be empty")
    if per_worker_batch > rows_per_worker:
        raise TrainingRefused(
            f"train.batch_size={batch_size} gives each of {world} worker(s) a batch of {per_worker_batch}, more "
            f"than the {rows_per_worker} training images each worker gets ({n_train} in all): not one full batch "
            "per epoch; lower train.batch_size")


def train_arch(
    p: Params, arch: str, *, out_dir: str | Path, metrics_path: str | Path, curve_path: str | Path,
    best_path: str | Path | None = "tune/best.json", grad_stats: GradStats | None = None,
) -> dict[str, Any]:
    """The train@ARCH stage: train `arch` with Ray Train, resume a killed run of the same params and
    data, export models/ARCH/, write final metrics and the per-epoch curve. Returns the final metrics.
    `grad_stats`: the measurement train.log_grad_stats logs (see make_job).

    Refuses (TrainingRefused) a run that would train nothing, before MLflow or Ray start, and (OutputLocked)
    a second run on the same model folder or the same trajectory (Ray run folder and MLflow resume key)."""
    p = with_absolute_paths(p)
    pretrained_weights(p, arch)  # missing weights fail here, before an MLflow run or Ray starts
    check_grad_stats(p, grad_stats)  # so does a measurement switched on and not given
    lr, warmup, lr_source = tuned_hparams(p, best_path, arch)
    epochs = p.train.epochs_for(arch)
    warmup = min(warmup, max(epochs - 1, 0))
    manifest = read_manifest(p.data.shards_dir)
    fingerprint = str(manifest["fingerprint"])
    # The resume key: the same trajectory (pipeline/training/identity.py) -> the same Ray run name and MLflow
    # run, so a rerun after a crash resumes from its checkpoint even when a runtime knob was edited meanwhile.
    name = train_run_name(p, arch, lr=lr, lr_warmup_epochs=warmup, data_fingerprint=fingerprint)
    n_train = sum(int(shard["rows"]) for split in train_split_names(p, manifest)
                  for shard in manifest["splits"][split]["shards"])
    check_trainable(n_train=n_train, num_classes=int(manifest["num_classes"]), batch_size=p.train.batch_size,
                    num_workers=p.train.num_workers, epochs=epochs)
    # The trajectory `name` is the Ray run folder and the MLflow resume key: two runs of it would share both.
    with output_lock(out_dir), output_lock(join(p.train.storage_path, name)):
        clean_stale_temps(out_dir)  # a killed export's temp folder
        return _train_arch_locked(p, arch, out_dir=out_dir, metrics_path=metrics_path, curve_path=curve_path,
                                  lr=lr, warmup=warmup, lr_source=lr_source, epochs=epochs, manifest=manifest,
                                  name=name, grad_stats=grad_stats)


def _train_arch_locked(
    p: Params, arch: str, *, out_dir: str | Path, metrics_path: str | Path, curve_path: str | Path, lr: float,
    warmup: int, lr_source: dict[str, Any], epochs: int, manifest: dict[str, Any], name: str,
    grad_stats: GradStats | None = None,
) -> dict[str, Any]:
    fingerprint = str(manifest["fingerprint"])
    run_id = tracking.start_run(
        p.tracking.experiment, f"train-{arch}",
        {**tracking.base_tags(f"train@{arch}", p.digest(), fingerprint), "trajectory.key": name},
        params={"arch": arch, "lr": lr, "lr_warmup_epochs": warmup, "hparams_from": lr_source["from"],
                **_flat("train", p.train.model_dump()), **_flat("model", p.model.model_dump())},
        resume_key=name,
    )
    tracking.log_config(run_id, p.model_dump(mode="json"))
    tracking.log_shards_input(run_id, manifest, p.data.shards_dir, "train")
    # A local Ray gets the workers' CPUs plus LOCAL_DATA_CPUS for Ray Data, whatever the worker layout.
    init_ray(min_cpus=p.train.num_workers * p.train.cpus_per_worker + LOCAL_DATA_CPUS)
    job = make_job(p, arch, lr, warmup, epochs, run_id, grad_stats=grad_stats)
    t0 = time.perf_counter()
    try:
        with tracking.system_metrics(run_id):
            outcome = run(build_trainer(job, p, name=name, num_workers=p.train.num_workers,
                                        storage_path=p.train.storage_path))
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    finally:
        release_request()
    wall = time.perf_counter() - t0
    for epoch in outcome.state.get("resumed_at", []):
        print(f"train {arch}: resumed from checkpoint at epoch {epoch} (not started over)", flush=True)
    export_model_dir(out_dir, outcome.state)
    if p.train.num_workers == 0 and job.checkpoint_dir:
        # The in-process run's scratch checkpoint (build_trainer): models/ARCH/ now holds what it had.
        shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
    last = outcome.history[-1]
    final = {
        "arch": arch, "epochs": last["epoch"], "lr": lr, "lr_warmup_epochs": warmup,
        "train_loss": last["train_loss"], "val_top1_err": last["val_top1_err"],
        "val_top5_err": last["val_top5_err"], "images_per_s": last["images_per_s"],
        "train_time_s": sum(h["epoch_time_s"] for h in outcome.history), "wall_time_s": wall,
        "mlflow_run_id": run_id,
        # Where this row's lr came from (training.tuned.tuned_lr_for) and what it trained on: the report shows both.
        "lr_source": lr_source,
        "train_splits": list(train_split_names(p, manifest)),
        "n_train_images": job.n_train,
        "resumed_at_epochs": list(outcome.state.get("resumed_at", [])),
    }
    write_json(metrics_path, final)
    write_csv(curve_path, [{k: v for k, v in h.items()} for h in outcome.history])
    tracking.log_artifact(run_id, curve_path, "curves")
    tracking.log_artifact(run_id, Path(out_dir) / "meta.json")
    tracking.set_tags(run_id, {"ray.run_name": name, "ray.path": str(outcome.path)})
    tracking.end_run(run_id)
    return final


def _flat(prefix: str, d: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in d.items()}
