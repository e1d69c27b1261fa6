"""Ray Tune search over learning rate and warmup with ASHA (Train V2 pattern: Tuner over a driver
function that starts one TorchTrainer per trial and reports through TuneReportCallback).

What a search may look at (docs/tuning.md):
- trials train on the `train` split (train minus minival) and are scored on `minival`, the seeded,
  class-balanced slice of train that prepare holds out; the val set is never opened by a trial (the val set
  is what the error table reports, so selecting on it would be test-set leakage);
- one ASHA search per arch of `tune.archs`; every trained arch takes the lr of its own entry, else of the
  tuned arch of its kind (family and block: basic vs bottleneck) nearest in depth (`lr_source_arch`);
- a trial trains with the final run's per-worker batch (train.batch_size / train.num_workers) on
  max(tune.workers_per_trial, 1) workers, so batch norm sees the batch it will see in the real run; its
  global batch is recorded;
- the lr is searched per 256 images (tune.lr_per_256_low/high): a trial trains at value x its global batch / 256,
  training at value x train.batch_size / 256 (the linear scaling rule), so one range means one thing whatever
  the batch;
- each trial is a complete shortened schedule, the final run's compressed onto tune.epochs: its own warmup (the
  searched choice, or the recipe's scaled), cosine to the trial's end or the step schedule's drops at the same
  shares of it; no EMA (the score is the raw weights'), validated every epoch (ASHA's rungs);
- no train stage takes tuned params (train.use_tuned false): the stage writes a stub best.json and costs nothing.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.archs import network_kind
from pipeline.config import Params, with_absolute_paths
from pipeline.training.tuned import BEST_VERSION, lr_for_batch, trial_recipe

# A trial's driver function only waits on its TorchTrainer: it needs no real CPU, and asking Tune's default
# 1 CPU for it is what makes Tune + Train look hung on a 2-core machine (seen).
TRIAL_DRIVER_CPUS = 0.01
# Logical CPUs left to Ray Data (file listing, reads, decode) next to the trials' workers: with less,
# every trial's ingest waits on a 0-CPU budget forever (seen on 2 cores).
DATA_CPU_RESERVE = 1.5
# The split trials are scored on; tune/best.json and the report name it.
SELECT_SPLIT = "minival"
TRANSFER_RULE = ("an arch takes its own tuned lr; otherwise that of the tuned arch of the same kind (model family "
                 "and block type, e.g. imagenet/basic for ResNet-18/34, imagenet/bottleneck for ResNet-50/101/152) "
                 "nearest in depth (the shallower on a tie), rescaled to train.batch_size by the linear rule")


def trial_batch(p: Params) -> tuple[int, int]:
    """(global batch of one trial, per-worker batch): the final run's per-worker batch (train.batch_size split
    over train.num_workers, as the training loop splits it) times the trial's workers, so each trial's batch norm
    and gradient noise per worker are the real run's."""
    per_worker = max(p.train.batch_size // max(p.train.num_workers, 1), 1)
    return per_worker * max(p.tune.workers_per_trial, 1), per_worker


def stub_best(p: Params) -> dict[str, Any]:
    """best.json when no train stage takes tuned params: no search runs; training refuses the file if
    train.use_tuned is switched on without rerunning tune (pipeline.training.tuned)."""
    return {"version": BEST_VERSION, "used": False, "archs": {},
            "why": "train.use_tuned is false: no train stage takes tuned params, so no search ran"}


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
    """One trial: trains config["arch"] on `train` (minus minival), validates on minival.
    workers_per_trial >= 1: a TorchTrainer whose reports reach Tune via TuneReportCallback.
    0: the loop runs in this trial process and reports to Tune itself (no worker group to start)."""
    from ray import tune

    from pipeline.analysis.measure import gradient_stats
    from pipeline.data.ingest import train_dataset, val_dataset
    from pipeline.training.loop import TuneTrialSession, run_loop
    from pipeline.training.trainer import build_trainer, fit, make_job, resolve_decode

    p = Params.model_validate(config["params"])
    # The rate at this trial's global batch (trial params carry it as train.batch_size) from the lr per 256.
    lr = lr_for_batch(float(config["lr_per_256"]), p.train.batch_size)
    job = make_job(p, config["arch"], lr, int(config["lr_warmup_epochs"]), p.tune.epochs, None,
                   train_fraction=p.tune.train_fraction, train_splits=("train",), val_split=SELECT_SPLIT,
                   grad_stats=gradient_stats)
    job.threads = int(config["threads"])
    if p.tune.workers_per_trial == 0:
        # Scratch: tune.report copies the directory into the trial's storage before it returns, so it is removed
        # when the trial ends, stopped by ASHA included (Tune stops a trial by raising SystemExit in its report).
        job.checkpoint_dir = tempfile.mkdtemp(prefix="resnet-trial-")
        # train.decode auto resolved for this trial's process (concurrent trials are not counted); a worker group
        # resolves it in build_trainer.
        job.decode = resolve_decode(p, 1).train.decode
        try:
            ds = train_dataset(job.train_files, crop=p.train.train_crop_size,
                               min_scale=p.train.train_crop_min_scale, seed=p.seed, decode=job.decode,
                               recipe=p.train, epochs=job.epochs, n_rows=job.n_train)
            val = val_dataset(job.val_files, resize=p.train.val_resize_size, crop=p.train.val_crop_size,
                              keep_keys=False)
            run_loop(job, TuneTrialSession(ds, val))
        finally:
            shutil.rmtree(job.checkpoint_dir, ignore_errors=True)
        return
    from ray.tune.integration.ray_train import TuneReportCallback

    # Train V2 inside a Tune function trainable: this trial process only drives the TorchTrainer's controller and
    # worker group; TuneReportCallback forwards rank 0's ray.train.report metrics to this trial's Tune session,
    # so ASHA stops the trial (and with it the worker group) at a rung.
    trainer = build_trainer(
        job, p, name=f"{config['run_name']}-{tune.get_context().get_trial_id()}",
        num_workers=p.tune.workers_per_trial, storage_path=config["storage_path"], callbacks=[TuneReportCallback()],
    )
    # A trial that diverges (or reads refused data) fails once, as itself: its worker group is not restarted
    # (pipeline.training.retry) and Tune does not retry a failed trial (its RunConfig keeps max_failures=0).
    fit(trainer)


def selection_split(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest's minival entry; a clear error when prepare carved none (tune must not fall back to val)."""
    from pipeline.data.sources import DataError

    entry = (manifest.get("splits") or {}).get(SELECT_SPLIT) or {}
    if int(entry.get("n_images", 0)) < 1:
        raise DataError(
            f"{where} has no {SELECT_SPLIT} split (images held out of train for tune to select on): set "
            "data.minival_per_class >= 1 and rerun the prepare stage; tune never selects on the val set"
        )
    return entry


def run_tune(p: Params, out_dir: str | Path, *, experiment_name: str | None = None) -> dict[str, Any]:
    """The tune stage: one ASHA search per arch of tune.archs; writes tune/best.json (one entry per arch, the
    split that selected it) and tune/trials.csv, logs a parent run per arch with child trials. With
    train.use_tuned false it only writes the stub (stub_best), an empty trials.csv and a placeholder figure."""
    from pipeline.runtime import write_csv, write_json

    out_dir = Path(out_dir)
    if not p.train.use_tuned:
        out_dir.mkdir(parents=True, exist_ok=True)
        result = stub_best(p)
        write_json(out_dir / "best.json", result)
        (out_dir / "trials.csv").write_text("arch,trial_id,lr_per_256,lr,lr_warmup_epochs\n")
        _plot_trials([], out_dir / "lr_vs_error.png")
        return result
    import ray

    from pipeline.cluster import cluster_can_grow, release_request, wait_for_resources
    from pipeline.data.shards import manifest_location, read_manifest
    from pipeline.runtime import init_ray

    p = with_absolute_paths(p)
    t = p.tune
    manifest = read_manifest(p.data.shards_dir)
    minival = selection_split(manifest, manifest_location(p.data.shards_dir))
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
    batch, per_worker_batch = trial_batch(p)
    all_rows: list[dict[str, Any]] = []
    entries: dict[str, dict[str, Any]] = {}
    names: dict[str, str] = {}
    for arch in t.archs:
        # The worker CPU share is decided here, the trial's global batch is the final run's per-worker batch
        # times its workers, and the schedule is this arch's final one compressed: the trials' params carry all.
        recipe, recipe_warmup = trial_recipe(p.train, arch, t.epochs)
        trial_params = p.model_copy(update={"train": p.train.model_copy(
            update={"cpus_per_worker": per_worker, "batch_size": batch, **recipe})})
        name = f"{experiment_name}-{arch}" if experiment_name else None
        rows, path, names[arch] = _search(p, trial_params, arch, manifest, name, concurrent, trial_request, gpu,
                                          recipe_warmup)
        ok = [r for r in rows if r["epochs_run"] > 0 and math.isfinite(r["selection_top1_err"])]
        if not ok:
            raise RuntimeError(f"no tune trial of {arch} reported a result; see {path}")
        best = min(ok, key=lambda r: r["selection_score"])  # least error first: the tie-break never reorders
        entries[arch] = {
            # The searched value and the rates it means: at the trial's batch and at the batch training uses.
            "lr_per_256": best["lr_per_256"], "lr": best["lr"],
            "lr_at_train_batch": lr_for_batch(best["lr_per_256"], p.train.batch_size),
            "train_batch_size": p.train.batch_size,
            "lr_warmup_epochs": int(best["lr_warmup_epochs"]), "lr_warmup_searched": t.lr_warmup_epochs is not None,
            "trial_epochs": t.epochs, "train_epochs": p.train.epochs_for(arch),
            "trial_lr_step_size": recipe["lr_step_size"], "trial_ema": False,
            "selection_top1_err": best["selection_top1_err"], "kind": "/".join(network_kind(arch)),
            "batch_size": batch, "per_worker_batch": per_worker_batch, "workers_per_trial": t.workers_per_trial,
            "trials": len(rows), "stopped_early": sum(r["stopped_early"] for r in rows),
            "not_run": sum(r["epochs_run"] == 0 for r in rows), "ray_name": names[arch],
        }
        all_rows += rows
    result = {
        "version": BEST_VERSION,
        # What chose every lr: the held-out slice of train, never the val set the table reports.
        "selected_on": SELECT_SPLIT,
        "selection_images": int(minival["n_images"]),
        "selection_split": {k: minival.get(k) for k in ("carved_from", "per_class", "seed", "keys_sha256")},
        "trained_on": "train (minus minival)",
        "train_images": int(manifest["splits"]["train"]["n_images"]),
        "data_fingerprint": str(manifest["fingerprint"]),
        "transfer_rule": TRANSFER_RULE,
        "used": True,
        "search": {"lr_per_256_low": t.lr_per_256_low, "lr_per_256_high": t.lr_per_256_high,
                   "lr_warmup_epochs": t.lr_warmup_epochs, "train_fraction": t.train_fraction,
                   "num_samples": t.num_samples, "epochs": t.epochs, "scheduler": "ASHA",
                   "grace_period": t.grace_period, "reduction_factor": t.reduction_factor},
        "archs": entries,
    }
    write_csv(out_dir / "trials.csv", [{k: v for k, v in r.items() if k != "history"} for r in all_rows])
    write_json(out_dir / "best.json", result)
    _plot_trials(all_rows, out_dir / "lr_vs_error.png")
    for arch in t.archs:
        _log_tune(p, manifest, arch, [r for r in all_rows if r["arch"] == arch], entries[arch], names[arch], out_dir)
    release_request()
    ray.shutdown()
    return result


def trial_outcome(trial: Any, epochs: int, failed: bool) -> str:
    """How an ended trial ended: "failed", "finished" (ran all `epochs` iterations) or "stopped" (early: ASHA,
    or the time budget)."""
    if failed:
        return "failed"
    ran = int((trial.last_result or {}).get("training_iteration", 0))
    return "finished" if ran >= epochs else "stopped"


def trials_progress(arch: str, total: int, trials: list[Any], ended: dict[str, str], best: float | None) -> str:
    """The tune console line: `ended` maps trial id -> `trial_outcome`; of the other trials in Tune's list
    (`.trial_id`, `.status`), RUNNING and PAUSED ones run, the rest (and those not created yet) are pending."""
    from pipeline.progress import trials_line

    outcomes = list(ended.values())
    running = sum(t.status in ("RUNNING", "PAUSED") for t in trials if t.trial_id not in ended)
    total = max(total, len(trials))
    return trials_line(arch, total=total, finished=outcomes.count("finished"), stopped=outcomes.count("stopped"),
                       failed=outcomes.count("failed"), running=running, pending=total - len(ended) - running,
                       best=best)


def _trials_callback(arch: str, total: int, epochs: int) -> Any:
    """A Tune callback that prints `trials_progress` each time a trial ends (finished, stopped or failed), with
    the best minival top-1 error any trial has reported so far. (Tune calls on_trial_complete while the trial's
    status still says RUNNING: the callback keeps its own record of which trials ended, and how.)"""
    from ray import tune

    from pipeline.progress import print_line

    class TrialsProgress(tune.Callback):
        def __init__(self) -> None:
            self.best: float | None = None
            self.ended: dict[str, str] = {}

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            err = result.get("val_top1_err")
            if isinstance(err, (int, float)) and math.isfinite(err):
                self.best = err if self.best is None else min(self.best, err)

        def _ended(self, trials: list, trial: Any, failed: bool) -> None:
            self.ended[trial.trial_id] = trial_outcome(trial, epochs, failed)
            print_line(trials_progress(arch, total, trials, self.ended, self.best))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trials, trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._ended(trials, trial, failed=True)

    return TrialsProgress()


def _search(p: Params, trial_params: Params, arch: str, manifest: dict[str, Any], name: str | None,
            concurrent: int, trial_request: float, gpu: dict[str, float],
            recipe_warmup: int) -> tuple[list[dict[str, Any]], str, str]:
    """One ASHA search over lr per 256 images (and warmup, when tune.lr_warmup_epochs lists choices) for `arch`
    (its own rungs: trials of different archs are never compared). Returns (rows, Ray path, Ray name); an
    interrupted search of the same identity resumes."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from pipeline.runtime import absolute_storage, ray_storage, worker_threads
    from pipeline.training.identity import tune_run_name

    t = p.tune
    # The search's identity (pipeline/training/identity.py): an interrupted search restores under this name.
    name = name or tune_run_name(p, arch, str(manifest["fingerprint"]))
    storage = absolute_storage(p.train.storage_path)
    param_space = {
        "arch": arch,
        "lr_per_256": tune.loguniform(t.lr_per_256_low, t.lr_per_256_high),
        "lr_warmup_epochs": recipe_warmup if t.lr_warmup_epochs is None else tune.choice(t.lr_warmup_epochs),
        "params": trial_params.model_dump(mode="json"),
        "threads": worker_threads(trial_params.train.cpus_per_worker),
        "run_name": name,
        "storage_path": storage,
    }
    tune_config = tune.TuneConfig(
        # The loop's minival top-1 error, ties broken by training loss (loop.rank_score): ASHA stops none of a
        # rung's tied trials, and a small minival ties many.
        metric="val_score",
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
    # An S3 endpoint from AWS_ENDPOINT_URL reaches Ray only as an explicit filesystem (pipeline.runtime),
    # with the path inside it.
    ray_path, ray_fs = ray_storage(storage)
    run_config = tune.RunConfig(name=name, storage_path=ray_path, storage_filesystem=ray_fs,
                                callbacks=[_trials_callback(arch, t.num_samples, t.epochs)])
    path = f"{storage}/{name}" if ray_fs is None else f"{ray_path}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=ray_fs):
        # An interrupted search resumes: finished trials are kept, unfinished ones continue.
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=ray_fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    grid = tuner.fit()

    batch = trial_params.train.batch_size
    rows = []
    for res in grid:
        cfg = res.config or {}
        df = res.metrics_dataframe
        hist = [] if df is None or df.empty else df.to_dict("records")
        rows.append({
            "arch": arch,
            "trial_id": (res.metrics or {}).get("trial_id", ""),
            "lr_per_256": cfg.get("lr_per_256"),
            "lr": None if cfg.get("lr_per_256") is None else lr_for_batch(cfg["lr_per_256"], batch),
            "lr_warmup_epochs": cfg.get("lr_warmup_epochs"),
            "batch_size": trial_params.train.batch_size,
            "epochs_run": len(hist),
            "selected_on": SELECT_SPLIT,
            "selection_top1_err": min((h["val_top1_err"] for h in hist), default=math.nan),
            # What ASHA ranked by; its minimum is at an epoch of least error (the tie-break never reorders errors).
            "selection_score": min((h["val_score"] for h in hist), default=math.nan),
            "final_selection_top1_err": hist[-1]["val_top1_err"] if hist else math.nan,
            "stopped_early": 0 < len(hist) < t.epochs,  # by ASHA (not started = cut by the time budget)
            "error": "" if res.error is None else type(res.error).__name__,
            "history": hist,
        })
    return rows, path, name


def _log_tune(p: Params, manifest: dict[str, Any], arch: str, rows: list[dict[str, Any]], best: dict[str, Any],
              name: str, out_dir: Path) -> None:
    """One parent run per tuned arch and a child run per trial, with its params and curve."""
    from pipeline import tracking

    tags = {**tracking.base_tags("tune", p.digest(), str(manifest["fingerprint"])), "tune.selected_on": SELECT_SPLIT}
    parent = tracking.start_run(p.tracking.experiment, f"tune-{arch}", tags,
                                params={"arch": arch, "batch_size": best["batch_size"],
                                        **{"tune." + k: v for k, v in p.tune.model_dump().items()}})
    tracking.log_shards_input(parent, manifest, p.data.shards_dir, "tune")
    for r in rows:
        child = tracking.start_run(p.tracking.experiment, f"trial-{r['trial_id']}", tags,
                                   params={"lr_per_256": r["lr_per_256"], "lr": r["lr"],
                                           "lr_warmup_epochs": r["lr_warmup_epochs"]},
                                   parent_run_id=parent)
        for h in r["history"]:
            metrics = {f"{SELECT_SPLIT}_{k[4:]}" if k.startswith("val_") else k: h[k]
                       for k in ("val_top1_err", "val_top5_err", "train_loss") if k in h}
            tracking.log_metrics(child, metrics, step=int(h.get("epoch", 0)))
        tracking.set_tags(child, {"stopped_early": str(r["stopped_early"])})
        tracking.end_run(child, "FAILED" if r["error"] else "FINISHED")
    tracking.log_metrics(parent, {f"best_{SELECT_SPLIT}_top1_err": best["selection_top1_err"], "best_lr": best["lr"],
                                  "best_lr_per_256": best["lr_per_256"],
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

    archs = sorted({r["arch"] for r in rows})
    if not archs:  # the stub: the output DVC expects, saying why it is empty
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no search: train.use_tuned is false", ha="center", va="center")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.5), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        mine = [r for r in rows if r["arch"] == arch]
        for w in sorted({r["lr_warmup_epochs"] for r in mine}):
            pts = [(r["lr_per_256"], r["selection_top1_err"]) for r in mine if r["lr_warmup_epochs"] == w]
            ax.scatter([a for a, _ in pts], [b for _, b in pts], label=f"warmup {w} ep")
        ax.set_xscale("log")
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("learning rate per 256 images")
        ax.set_ylabel(f"best {SELECT_SPLIT} top-1 error (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
