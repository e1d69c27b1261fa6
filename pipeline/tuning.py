"""Ray Tune search over learning rate and warmup with ASHA (Train V2 pattern: Tuner over a driver
function that starts one TorchTrainer per trial and reports through TuneReportCallback)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Params, with_absolute_paths

# A trial's driver function only waits on its TorchTrainer: it needs no real CPU, and asking Tune's default
# 1 CPU for it is what makes Tune + Train look hung on a 2-core machine (seen).
TRIAL_DRIVER_CPUS = 0.01
# Logical CPUs left to Ray Data (file listing, reads, decode) next to the trials' workers: with less,
# every trial's ingest waits on a 0-CPU budget forever (seen on 2 cores).
DATA_CPU_RESERVE = 1.5


def trial_resources(
    total_cpus: float, cpus_per_worker: float, workers_per_trial: int, requested: int | None
) -> tuple[int, float, float]:
    """(max_concurrent_trials, CPUs per training process, CPUs the trial itself asks for), from what Ray
    reports, so that a 2-core machine never waits for a placement group that cannot exist and a cluster
    runs many trials side by side.

    workers_per_trial == 0: the trial trains in its own process and asks for the CPUs itself.
    workers_per_trial >= 1: the trial only drives its worker group and asks for almost nothing.
    """
    usable = max(total_cpus - DATA_CPU_RESERVE, 0.25)
    per_worker = min(cpus_per_worker, usable / max(workers_per_trial, 1))
    per_trial = per_worker * max(workers_per_trial, 1) + TRIAL_DRIVER_CPUS
    fit = max(int(usable // per_trial), 1)
    trial_request = per_worker if workers_per_trial == 0 else TRIAL_DRIVER_CPUS
    return (min(requested, fit) if requested else fit), per_worker, trial_request


def _trial(config: dict[str, Any]) -> None:
    """One trial. workers_per_trial >= 1: a TorchTrainer whose reports reach Tune via TuneReportCallback.
    0: the loop runs in this trial process and reports to Tune itself (no worker group to start)."""
    from ray import tune

    from pipeline.data.ingest import train_dataset, val_dataset
    from pipeline.training.loop import TuneTrialSession, run_loop
    from pipeline.training.trainer import build_trainer, make_job

    p = Params.model_validate(config["params"])
    job = make_job(p, p.tune.arch, float(config["lr"]), int(config["lr_warmup_epochs"]), p.tune.epochs, None,
                   train_fraction=p.tune.train_fraction)
    job.threads = int(config["threads"])
    if p.tune.workers_per_trial == 0:
        job.checkpoint_dir = tempfile.mkdtemp(prefix="resnet-trial-")  # Tune copies it at each report
        ds = train_dataset(job.train_files, crop=p.train.train_crop_size, min_scale=p.train.train_crop_min_scale,
                           seed=p.seed, recipe=p.train, epochs=job.epochs, n_rows=job.n_train)
        val = val_dataset(job.val_files, resize=p.train.val_resize_size, crop=p.train.val_crop_size,
                          keep_keys=False)
        run_loop(job, TuneTrialSession(ds, val))
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = build_trainer(
        job, p, name=f"{config['run_name']}-{tune.get_context().get_trial_id()}",
        num_workers=p.tune.workers_per_trial, storage_path=config["storage_path"], callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def run_tune(p: Params, out_dir: str | Path, *, experiment_name: str | None = None) -> dict[str, Any]:
    """The tune stage: writes tune/best.json and tune/trials.csv, logs a parent run with child trials."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline.cluster import cluster_can_grow, release_request, wait_for_resources
    from pipeline.data.shards import read_manifest
    from pipeline.training.identity import tune_run_name
    from pipeline.training.trainer import _storage, init_ray, worker_threads, write_csv_atomic, write_json_atomic

    p = with_absolute_paths(p)
    t = p.tune
    out_dir = Path(out_dir)
    resources = init_ray()
    gpu = {"GPU": 1.0} if p.train.use_gpu else {}
    if cluster_can_grow():
        # A cluster that can grow: size from what the params ask for, not from the nodes up right now (on an
        # autoscaling cluster that is a head with no GPU). Tune queues the trials that do not fit yet; wait
        # only for the first one's resources, so a cluster that cannot bring them up fails with a message.
        per_worker = p.train.cpus_per_worker
        concurrent = t.max_concurrent_trials or t.num_samples
        trial_request = per_worker if t.workers_per_trial == 0 else TRIAL_DRIVER_CPUS
        one_trial = ([{"CPU": per_worker, **gpu}] if t.workers_per_trial == 0 else
                     [{"CPU": TRIAL_DRIVER_CPUS}] + [{"CPU": per_worker, **gpu}] * t.workers_per_trial)
        wait_for_resources(one_trial + [{"CPU": DATA_CPU_RESERVE}], what="the first tune trial",
                           keys="train.cpus_per_worker, tune.workers_per_trial or train.use_gpu",
                           timeout_s=p.cluster.wait_for_resources_s)
    else:
        concurrent, per_worker, trial_request = trial_resources(
            resources.get("CPU", 1.0), p.train.cpus_per_worker, t.workers_per_trial, t.max_concurrent_trials
        )
    manifest = read_manifest(p.data.shards_dir)
    # The search's identity (pipeline/training/identity.py): an interrupted search restores under this name.
    name = experiment_name or tune_run_name(p, str(manifest["fingerprint"]))
    storage = _storage(p.train.storage_path)
    # The worker CPU share is decided here, so the trials' params carry it.
    trial_params = p.model_copy(update={"train": p.train.model_copy(update={"cpus_per_worker": per_worker})})
    param_space = {
        "lr": tune.loguniform(t.lr_low, t.lr_high),
        "lr_warmup_epochs": tune.choice(t.lr_warmup_epochs),
        "params": trial_params.model_dump(mode="json"),
        "threads": worker_threads(per_worker),
        "run_name": name,
        "storage_path": storage,
    }
    tune_config = tune.TuneConfig(
        metric="val_top1_err",
        mode="min",
        num_samples=t.num_samples,
        # ASHA (Li et al. 2020): stop the worse half of trials at each rung (grace_period, x reduction_factor).
        scheduler=ASHAScheduler(time_attr="training_iteration", max_t=t.epochs, grace_period=t.grace_period,
                                reduction_factor=t.reduction_factor),
        # Seeded proposals: the same seed proposes the same configurations.
        # (max_concurrent goes on the generator: TuneConfig.max_concurrent_trials is ignored for it.)
        search_alg=BasicVariantGenerator(random_state=p.seed, max_concurrent=concurrent),
        time_budget_s=t.time_budget_s,
    )
    # A trial that trains in its own process holds its GPU itself; one that drives a worker group asks none.
    trainable = tune.with_resources(_trial, {"CPU": trial_request, **(gpu if t.workers_per_trial == 0 else {})})
    path = f"{storage}/{name}"
    # An S3 endpoint from AWS_ENDPOINT_URL reaches Ray only as an explicit filesystem (pipeline.data.storage),
    # with the path inside it.
    from pipeline.data.storage import ray_storage

    ray_path, ray_fs = ray_storage(storage)
    run_config = tune.RunConfig(name=name, storage_path=ray_path, storage_filesystem=ray_fs)
    path = path if ray_fs is None else f"{ray_path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=ray_fs):
        # An interrupted search resumes: finished trials are kept, unfinished ones continue.
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=ray_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()

    rows = []
    for res in grid:
        cfg = res.config or {}
        df = res.metrics_dataframe
        hist = [] if df is None or df.empty else df.to_dict("records")
        rows.append({
            "trial_id": (res.metrics or {}).get("trial_id", ""),
            "lr": cfg.get("lr"), "lr_warmup_epochs": cfg.get("lr_warmup_epochs"),
            "epochs_run": len(hist),
            "val_top1_err": min((h["val_top1_err"] for h in hist), default=math.nan),
            "final_val_top1_err": hist[-1]["val_top1_err"] if hist else math.nan,
            "stopped_early": 0 < len(hist) < t.epochs,  # by ASHA (not started = cut by the time budget)
            "error": "" if res.error is None else type(res.error).__name__,
            "history": hist,
        })
    ok = [r for r in rows if r["epochs_run"] > 0 and math.isfinite(r["val_top1_err"])]
    if not ok:
        raise RuntimeError(f"no tune trial reported a result; see {path}")
    best = min(ok, key=lambda r: r["val_top1_err"])
    result = {
        "lr": best["lr"], "lr_warmup_epochs": int(best["lr_warmup_epochs"]),
        "val_top1_err": best["val_top1_err"], "batch_size": p.train.batch_size, "arch": t.arch,
        "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
        "not_run": sum(r["epochs_run"] == 0 for r in rows),
        "search": {"lr_low": t.lr_low, "lr_high": t.lr_high, "lr_warmup_epochs": t.lr_warmup_epochs},
    }
    write_csv_atomic(out_dir / "trials.csv", [{k: v for k, v in r.items() if k != "history"} for r in rows])
    write_json_atomic(out_dir / "best.json", result)
    _plot_trials(rows, out_dir / "lr_vs_error.png")
    _log_tune(p, manifest, rows, result, name, out_dir)
    release_request()
    ray.shutdown()
    return result


def _log_tune(p: Params, manifest: dict[str, Any], rows: list[dict[str, Any]], best: dict[str, Any],
              name: str, out_dir: Path) -> None:
    """One parent run for the search and a child run per trial, with its params and curve."""
    from pipeline import tracking

    tags = tracking.base_tags("tune", p.digest(), str(manifest["fingerprint"]))
    parent = tracking.start_run(p.tracking.experiment, f"tune-{p.tune.arch}", tags,
                                params={"tune." + k: v for k, v in p.tune.model_dump().items()})
    tracking.log_shards_input(parent, manifest, p.data.shards_dir, "tune")
    for r in rows:
        child = tracking.start_run(p.tracking.experiment, f"trial-{r['trial_id']}", tags,
                                   params={"lr": r["lr"], "lr_warmup_epochs": r["lr_warmup_epochs"]},
                                   parent_run_id=parent)
        for h in r["history"]:
            tracking.log_metrics(child, {k: h[k] for k in ("val_top1_err", "val_top5_err", "train_loss")
                                         if k in h}, step=int(h.get("epoch", 0)))
        tracking.set_tags(child, {"stopped_early": str(r["stopped_early"])})
        tracking.end_run(child, "FAILED" if r["error"] else "FINISHED")
    tracking.log_metrics(parent, {"best_val_top1_err": best["val_top1_err"], "best_lr": best["lr"],
                                  "best_lr_warmup_epochs": best["lr_warmup_epochs"]})
    tracking.set_tags(parent, {"ray.tune_name": name})
    tracking.log_config(parent, p.model_dump(mode="json"))
    for f in ("trials.csv", "best.json", "lr_vs_error.png"):
        tracking.log_artifact(parent, out_dir / f)
    tracking.end_run(parent)


def _plot_trials(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for w in sorted({r["lr_warmup_epochs"] for r in rows}):
        pts = [(r["lr"], r["val_top1_err"]) for r in rows if r["lr_warmup_epochs"] == w]
        ax.scatter([a for a, _ in pts], [b for _, b in pts], label=f"warmup {w} ep")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best val top-1 error (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
