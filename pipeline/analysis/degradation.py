"""The degradation experiment (He et al. 2015, section 4.1 Fig. 4 and section 4.2 Fig. 6), small enough to run
inside `dvc repro`.

Plain and residual networks of two depths are trained with one recipe, in this process
(`pipeline.training.local`: Ray's start-up would cost a third of the stage's ~90 s budget on 2 cores), through
the project's own training loop (`run_loop`: optimiser, LR schedule, augmentation, evaluation, MLflow logging
as in the train stage). The stage writes, under its output folder:

    degradation.png          training (dashed) and validation (bold) top-1 error per epoch, paper Fig. 4/6 style
    gradient_flow.png        per-layer gradient norm of every trained model on one val batch (plain vs residual)
    gradient_flow_init.png   the same at initialisation
    degradation.csv          one row per model per epoch: errors, loss, epoch and cumulative wall time
    degradation.json         the rows, the recipe, the budget used, final errors, the gradient-flow numbers
    degradation.md           a summary: data (SYNTHETIC or not), budget, final errors, what they show, figures

and a small DVC metrics file. Whatever the numbers show is reported as it is: on a budget of seconds the
deeper plain network may or may not train worse than the shallower one.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline import tracking
from pipeline.analysis.measure import depth_gradient_norms, gradient_stats
from pipeline.config import Params, with_absolute_paths
from pipeline.data.shards import read_manifest, read_shard, shard_files
from pipeline.data.transforms import normalize, val_image
from pipeline.models import build_model, count_params, model_info
from pipeline.runtime import publish_dir, write_json
from pipeline.training.checkpoint import load_train_state
from pipeline.training.local import InMemoryShard, InProcessSession
from pipeline.training.loop import model_kwargs, run_loop
from pipeline.training.trainer import make_job

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest

FIGURE = "degradation.png"
GRADIENT_FIGURE = "gradient_flow.png"
GRADIENT_INIT_FIGURE = "gradient_flow_init.png"
CSV_FILE = "degradation.csv"
JSON_FILE = "degradation.json"
SUMMARY_FILE = "degradation.md"
ROW_KEYS = ("model", "family", "layers", "epoch", "train_top1_err", "val_top1_err", "train_loss",
            "epoch_time_s", "wall_time_s")


def is_plain(arch: str) -> bool:
    """Plain nets are named plainNN (pipeline.models; the same rule as plot_degradation's panels)."""
    return "plain" in arch.lower()


def recipe_params(p: Params) -> Params:
    """`p` with `train`/`model` replaced by the degradation recipe: the `degradation` section's epochs, batch, lr,
    warmup, threads, shortcut and init; everything else (optimiser, momentum, weight decay, schedule, crops,
    mixup/cutmix, clipping, precision) from `train`, identical for every model. In-process (num_workers 0), on
    crops and flips only (auto_augment, random_erase, pca_lighting, ra_sampler, the scale augmentation and progressive
    resizing are off)."""
    deg = p.degradation
    update: dict[str, Any] = {
        "epochs": deg.epochs, "epochs_by_arch": {}, "batch_size": deg.batch_size, "lr": deg.lr,
        "lr_warmup_epochs": deg.lr_warmup_epochs, "use_tuned": False, "num_workers": 0,
        "cpus_per_worker": float(deg.threads), "use_gpu": False, "model_ema_decay": 0.0,
        # The in-process shard (training.local.InMemoryShard) crops and flips only: the per-image policies of the
        # decode tasks are off here rather than recorded as if applied (mixup/cutmix, in the loop, do apply).
        "auto_augment": None, "random_erase": 0.0, "ra_sampler": False, "prog_resize_min_size": None,
        "pca_lighting": 0.0, "train_scale_range": None,
    }
    if "pretrained" in type(p.train).model_fields:
        update["pretrained"] = None  # the experiment trains every net from scratch, as the paper does
    train = p.train.model_copy(update=update)
    model = p.model.model_copy(update={
        "archs": list(deg.archs), "shortcut": deg.shortcut, "zero_init_residual": deg.zero_init_residual,
        "dropout": 0.0, "checkpoint_activations": False,
    })
    # Validate the combination once here, so a bad mix fails before any training.
    return Params.model_validate({**p.model_dump(mode="json"), "train": train.model_dump(mode="json"),
                                  "model": model.model_dump(mode="json")})


def run_degradation(p: Params, out_dir: str | Path, metrics_path: str | Path) -> dict[str, Any]:
    """The degradation stage. Writes `out_dir` (replaced as a whole) and `metrics_path`; returns the JSON
    record. With `degradation.enabled: false` it only writes a summary saying so (and empty numbers)."""
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if p.degradation.enabled:
        record = _run_enabled(p, tmp, t_start)
    else:
        record = _disabled_record()
        _write_outputs(tmp, record)
    publish_dir(tmp, out_dir)
    write_json(metrics_path, _dvc_metrics(record))
    return record


# ---------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------


def _run_enabled(p: Params, out: Path, t_start: float) -> dict[str, Any]:
    from pipeline.analysis.plots import compare_gradient_flow, plot_degradation

    p = with_absolute_paths(p)
    deg = p.degradation
    run_p = recipe_params(p)
    manifest = read_manifest(p.data.shards_dir)
    fingerprint = str(manifest["fingerprint"])
    synthetic = is_synthetic(manifest)
    recipe = _recipe(run_p)
    parent = tracking.start_run(
        p.tracking.experiment, "degradation", tracking.base_tags("degradation", p.digest(), fingerprint),
        params={**recipe, "archs": ",".join(deg.archs), "synthetic": synthetic},
    )
    threads_before = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="degradation-") as ckpt_root:
            runs = {arch: _train_one(run_p, arch, parent, fingerprint, Path(ckpt_root) / arch)
                    for arch in deg.archs}
        trained = {arch: r["model"] for arch, r in runs.items() if r["model"] is not None}
        curves = {arch: r["history"] for arch, r in runs.items() if r["history"]}
        rows = [row for r in runs.values() for row in r["rows"]]
        figures: list[str] = []
        if curves:
            plot_degradation(curves, out / FIGURE)
            figures.append(FIGURE)
        images, targets = _val_batch(run_p, deg.grad_batch)
        initial = {arch: _initial_model(run_p, arch, runs[arch]["num_classes"]) for arch in deg.archs}
        gradient_flow = {"init": _depth_norms(initial, images, targets)}
        compare_gradient_flow(initial, images, targets, out / GRADIENT_INIT_FIGURE)
        figures.append(GRADIENT_INIT_FIGURE)
        if trained:
            gradient_flow["trained"] = _depth_norms(trained, images, targets)
            compare_gradient_flow(trained, images, targets, out / GRADIENT_FIGURE)
            figures.insert(1 if curves else 0, GRADIENT_FIGURE)
        seen = _images_seen(run_p, runs[deg.archs[0]]["n_train"])
        record = {
            "enabled": True,
            "dataset": "SYNTHETIC" if synthetic else str(manifest.get("source", {}).get("layout", "unknown")),
            "synthetic": synthetic,
            "data_fingerprint": fingerprint,
            "num_classes": int(manifest["num_classes"]),
            "archs": list(deg.archs),
            "recipe": recipe,
            "models": {arch: _final(arch, r) for arch, r in runs.items()},
            "rows": rows,
            "gradient_flow": {"batch": len(targets), **gradient_flow},
            "observations": observations({arch: r["history"] for arch, r in runs.items()}, seen),
            "figures": figures,
            "mlflow_run_id": parent,
            "budget": {
                "wall_time_s": round(time.perf_counter() - t_start, 2),
                "train_wall_time_s": round(sum(r["wall_time_s"] for r in runs.values()), 2),
                "epochs": deg.epochs,
                "train_images_per_epoch": seen,  # whole batches of a fresh shuffle of the available images
                "train_images_available": runs[deg.archs[0]]["n_train"],
                "val_images": runs[deg.archs[0]]["n_val"],
                "batch_size": deg.batch_size,
                "threads": deg.threads,
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            },
        }
        _write_outputs(out, record)
        for name in (*figures, CSV_FILE, JSON_FILE, SUMMARY_FILE):
            tracking.log_artifact(parent, out / name, "degradation")
        finals = {}
        for arch, model_record in record["models"].items():
            for key in ("train_top1_err", "val_top1_err", "wall_time_s"):
                if model_record.get(key) is not None:
                    finals[f"{key}/{arch}"] = model_record[key]
        tracking.log_metrics(parent, {**finals, "wall_time_s": record["budget"]["wall_time_s"]})
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    finally:
        torch.set_num_threads(threads_before)
    tracking.end_run(parent)
    return record


def _train_one(run_p: Params, arch: str, parent_run: str, fingerprint: str, ckpt_dir: Path) -> dict[str, Any]:
    """Train `arch` with run_loop in this process; its per-epoch metrics go to a child MLflow run."""

    deg = run_p.degradation
    child = tracking.start_run(
        run_p.tracking.experiment, f"degradation-{arch}",
        tracking.base_tags("degradation", run_p.digest(), fingerprint),
        params={"arch": arch, **model_kwargs(run_p, arch)}, parent_run_id=parent_run,
    )
    t0 = time.perf_counter()
    job = make_job(run_p, arch, deg.lr, deg.lr_warmup_epochs, deg.epochs, child, grad_stats=gradient_stats)
    shard = InMemoryShard(job.train_files, crop=run_p.train.train_crop_size,
                          min_scale=run_p.train.train_crop_min_scale, limit=deg.train_images)
    if len(shard) < deg.batch_size:
        tracking.end_run(child, "FAILED")
        raise ValueError(f"degradation: {len(shard)} train images < degradation.batch_size {deg.batch_size}: "
                         "not one full batch (the loop drops the last partial batch); lower the batch size")
    job.n_train = len(shard)
    job.threads = deg.threads
    ckpt_dir.mkdir(parents=True)
    job.checkpoint_dir = str(ckpt_dir)  # the loop rewrites it each epoch
    session = InProcessSession(shard)
    status = "completed"
    try:
        run_loop(job, session)
    except FloatingPointError as exc:
        # A diverged run is a result of the experiment, not a crash of the stage: keep the epochs it finished.
        status = f"diverged: {exc}"
    except BaseException:
        tracking.end_run(child, "FAILED")
        raise
    wall = time.perf_counter() - t0
    model: nn.Module | None = None
    history: list[dict[str, Any]] = []
    if session.checkpoint_dir:
        state = load_train_state(session.checkpoint_dir)
        history = list(state["history"])
        model = build_model(arch, num_classes=job.num_classes, **model_kwargs(run_p, arch))
        model.load_state_dict(state["model"])
        model.train()  # measured as trained: BN on batch statistics
    layers = int(model_info(arch)["layers"])
    rows = []
    for row, elapsed in zip(history, session.report_times, strict=False):
        rows.append({
            "model": arch, "family": "plain" if is_plain(arch) else "residual", "layers": layers,
            "epoch": int(row["epoch"]), "train_top1_err": round(float(row["train_top1_err"]), 4),
            "val_top1_err": round(float(row["val_top1_err"]), 4), "train_loss": round(float(row["train_loss"]), 5),
            "epoch_time_s": round(float(row["epoch_time_s"]), 3), "wall_time_s": round(elapsed - t0, 3),
        })
    tracking.log_metrics(child, {"wall_time_s": wall})
    tracking.set_tags(child, {"degradation.status": status[:250]})
    tracking.end_run(child, "FINISHED" if status == "completed" else "FAILED")
    n_val = int(history[-1]["val_images"]) if history else 0
    print(f"degradation {arch}: {status}, {len(history)} epochs, {wall:.1f}s"
          + (f", train err {rows[-1]['train_top1_err']:.1f}%, val err {rows[-1]['val_top1_err']:.1f}%"
             if rows else ""), flush=True)
    return {"model": model, "history": history, "rows": rows, "status": status, "wall_time_s": wall,
            "n_train": len(shard), "n_val": n_val, "num_classes": job.num_classes, "layers": layers,
            "params": _count_params(arch, job.num_classes, run_p), "mlflow_run_id": child}


def _images_seen(run_p: Params, n_train: int) -> int:
    """Train images per epoch that the training error counts (whole batches: the loop drops the last one)."""
    batch = run_p.train.batch_size
    return max(n_train // batch, 1) * batch if n_train >= batch else n_train


def _count_params(arch: str, num_classes: int, run_p: Params) -> int:
    return count_params(build_model(arch, num_classes=num_classes, **model_kwargs(run_p, arch)))


def _initial_model(run_p: Params, arch: str, num_classes: int) -> nn.Module:
    """The exact initial weights of the trained run: run_loop seeds torch with `seed + rank` (rank 0) first."""

    torch.manual_seed(run_p.seed)
    return build_model(arch, num_classes=num_classes, **model_kwargs(run_p, arch))


def _val_batch(run_p: Params, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` val images after the eval transform, normalised: (n, 3, crop, crop) and labels (n,)."""

    tp = run_p.train
    pixels: list[np.ndarray] = []
    labels: list[int] = []
    for path in shard_files(run_p.data.shards_dir, "val"):
        table = read_shard(path, columns=["image", "label"])
        for data, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
            pixels.append(val_image(data, tp.val_resize_size, tp.val_crop_size))
            labels.append(int(label))
            if len(pixels) == n:
                break
        if len(pixels) == n:
            break
    images = normalize(torch.from_numpy(np.stack(pixels)))  # (n, 3, crop, crop) float32
    return images, torch.tensor(labels, dtype=torch.int64)


def _depth_norms(models: dict[str, nn.Module], images: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Per model: the gradient norm of each weighted layer of the main path, input to output (the figure's
    numbers), and the ratio first/last layer."""
    result = {}
    for arch, model in models.items():
        norms = [value for _, value in depth_gradient_norms(model, images, targets)]
        result[arch] = {"norms": [float(f"{v:.6g}") for v in norms],
                        "first_over_last": float(f"{norms[0] / norms[-1]:.6g}") if norms[-1] > 0 else None}
    return result


def _recipe(run_p: Params) -> dict[str, Any]:
    tp, mp = run_p.train, run_p.model
    keys = ("epochs", "batch_size", "opt", "lr", "momentum", "weight_decay", "norm_weight_decay", "lr_scheduler",
            "lr_warmup_epochs", "label_smoothing", "clip_grad_norm", "amp", "train_crop_size",
            "train_crop_min_scale", "val_resize_size", "val_crop_size", "mixup_alpha", "cutmix_alpha",
            "log_grad_stats")
    recipe = {k: getattr(tp, k) for k in keys}
    recipe.update({"shortcut": mp.shortcut, "zero_init_residual": mp.zero_init_residual, "seed": run_p.seed,
                   "train_images": run_p.degradation.train_images, "threads": run_p.degradation.threads})
    return recipe


def _final(arch: str, run: dict[str, Any]) -> dict[str, Any]:
    last = run["rows"][-1] if run["rows"] else {}
    return {
        "family": "plain" if is_plain(arch) else "residual", "layers": run["layers"], "params": run["params"],
        "status": run["status"], "epochs": len(run["rows"]),
        "train_top1_err": last.get("train_top1_err"), "val_top1_err": last.get("val_top1_err"),
        "epoch_time_s": round(sum(row["epoch_time_s"] for row in run["rows"]), 2),
        "wall_time_s": round(run["wall_time_s"], 2), "mlflow_run_id": run["mlflow_run_id"],
    }


def is_synthetic(manifest: Manifest) -> bool:
    """The embedded generated set: its layout is "synthetic", or every class name says so."""
    if str(manifest.get("source", {}).get("layout", "")) == "synthetic":
        return True
    names = [str(c.get("name", "")) for c in manifest.get("classes", [])]
    return bool(names) and all(name.startswith("synthetic") for name in names)


def observations(histories: dict[str, list[dict[str, Any]]], train_images: int) -> list[dict[str, Any]]:
    """Per family, the deepest against the shallowest model's final training error (the paper's comparison:
    plain-56 vs plain-20 is degradation when the deeper net's TRAINING error is higher). Computed, never
    assumed: a difference within two binomial standard errors of the difference (errors measured on
    `train_images` images each) is reported as "within noise", not as a finding."""
    found = []
    for family in ("plain", "residual"):
        archs = [a for a, h in histories.items() if h and (is_plain(a) == (family == "plain"))]
        if len(archs) < 2:
            continue
        archs.sort(key=lambda a: int(model_info(a)["layers"]))
        shallow, deep = archs[0], archs[-1]
        s, d = histories[shallow][-1], histories[deep][-1]
        err_s, err_d = float(s["train_top1_err"]), float(d["train_top1_err"])
        variance = sum(e / 100 * (1 - e / 100) for e in (err_s, err_d)) / max(train_images, 1)
        noise = 100 * 2 * math.sqrt(variance)  # percentage points
        verdict = "higher" if err_d - err_s > noise else "lower" if err_s - err_d > noise else "within noise"
        found.append({
            "family": family, "shallow": shallow, "deep": deep,
            "train_err_shallow": round(err_s, 2), "train_err_deep": round(err_d, 2),
            "val_err_shallow": round(float(s["val_top1_err"]), 2), "val_err_deep": round(float(d["val_top1_err"]), 2),
            "two_se_points": round(noise, 2), "deeper_train_err": verdict,
        })
    return found


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


def _disabled_record() -> dict[str, Any]:
    return {"enabled": False, "archs": [], "models": {}, "rows": [], "figures": [], "observations": [],
            "budget": {"wall_time_s": 0.0}}


def _write_outputs(out: Path, record: dict[str, Any]) -> None:
    import csv

    write_json(out / JSON_FILE, record)
    with (out / CSV_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_KEYS))
        writer.writeheader()
        writer.writerows(record["rows"])
    (out / SUMMARY_FILE).write_text(summary_markdown(record))


def _dvc_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Numbers only (what `dvc metrics show/diff` compares): final errors per model and the budget used."""
    metrics: dict[str, Any] = {"enabled": int(record["enabled"]), "wall_time_s": record["budget"]["wall_time_s"]}
    if record["enabled"]:
        budget = record["budget"]
        metrics.update({"epochs": budget["epochs"], "train_images": budget["train_images_per_epoch"]})
        metrics["models"] = {
            arch: {k: m[k] for k in ("train_top1_err", "val_top1_err", "wall_time_s") if m.get(k) is not None}
            for arch, m in record["models"].items()
        }
    return metrics


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def summary_markdown(record: dict[str, Any]) -> str:
    """degradation.md: what ran, on what data, with which budget, what came out; the figures embedded."""
    title = "# Degradation experiment: plain vs residual networks (He et al. 2015, Fig. 4 / Fig. 6)\n\n"
    if not record["enabled"]:
        return (title + "**Switched off** (`degradation.enabled: false` in the params file): nothing was trained.\n"
                "Turn it on with `degradation.enabled: true` (or `python -m stages.degradation --set "
                "degradation.enabled=true`).\n")
    budget, recipe = record["budget"], record["recipe"]
    lines = [title]
    if record["synthetic"]:
        lines.append(
            f"> **SYNTHETIC data.** {record['num_classes']} generated classes (shapes, colours, textures) from the "
            "embedded default run, not CIFAR-10 or ImageNet: these numbers say nothing about the paper's.\n\n"
        )
    else:
        lines.append(f"Data: `{record['dataset']}` shards, {record['num_classes']} classes.\n\n")
    lines.append(
        f"**Budget used:** {budget['wall_time_s']:.0f} s wall for the whole stage ({budget['train_wall_time_s']:.0f} s "
        f"of it training), on {budget['threads']} torch threads of a {budget['cpu_count']}-CPU machine "
        f"(torch {budget['torch']}). Every model: {_plural(budget['epochs'], 'epoch')} of "
        f"{budget['train_images_per_epoch']} (of {budget['train_images_available']}, a fresh shuffle each epoch) "
        f"train images ({recipe['train_crop_size']} px crops), evaluated on {budget['val_images']} val images, "
        f"batch {budget['batch_size']}, {recipe['opt']} lr {recipe['lr']:g} ({recipe['lr_scheduler']}, "
        f"{recipe['lr_warmup_epochs']} warmup epochs), weight decay {recipe['weight_decay']:g}; residual nets with "
        f"option {recipe['shortcut']} shortcuts, zero_init_residual {str(recipe['zero_init_residual']).lower()}. "
        "The same recipe for every model. Training error is the running error over each epoch's augmented "
        "batches, as the training loop measures it.\n\n"
    )
    lines.append("| model | family | weighted layers | params | epochs | final train err (%) | final val err (%) "
                 "| train + eval (s) | wall (s) | status |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for arch, m in record["models"].items():
        lines.append(f"| {arch} | {m['family']} | {m['layers']} | {m['params']:,} | {m['epochs']} "
                     f"| {_fmt(m['train_top1_err'])} | {_fmt(m['val_top1_err'])} | {m['epoch_time_s']:.1f} "
                     f"| {m['wall_time_s']:.1f} | {m['status'].split(':')[0]} |\n")
    lines.append("\n*train + eval*: the epochs' own time; *wall*: also model set-up, data loading, checkpoints and "
                 "MLflow logging (the first model pays for the imports).\n")
    lines.append("\n**What this run shows** (computed from the final epoch, not assumed):\n\n")
    for obs in record["observations"]:
        verdict = obs["deeper_train_err"]
        if obs["family"] == "plain":
            meaning = {"higher": "the degradation problem of section 4.1 is visible at this budget",
                       "lower": "no degradation at this budget: the deeper plain net trains better so far",
                       "within noise": "no degradation visible at this budget"}[verdict]
        else:
            meaning = {"higher": "unlike the paper's ResNets, depth did not help at this budget",
                       "lower": "as in the paper, the deeper ResNet trains better",
                       "within noise": "depth made no measurable difference at this budget"}[verdict]
        lines.append(f"- {obs['family']}: {obs['deep']} training error {obs['train_err_deep']:.1f}% vs "
                     f"{obs['shallow']} {obs['train_err_shallow']:.1f}% ({verdict}; two standard errors = "
                     f"{obs['two_se_points']:.1f} points); validation {obs['val_err_deep']:.1f}% vs "
                     f"{obs['val_err_shallow']:.1f}%: {meaning}.\n")
    if not record["observations"]:
        lines.append("- fewer than two trained models per family: no depth comparison.\n")
    lines.append(
        "\nA few epochs on a small generated set are far from the paper's 64k iterations on CIFAR-10: read the "
        "curves as a smoke test of the experiment, and rerun with more `degradation.epochs` / real data for the "
        "paper's comparison.\n\n"
    )
    captions = {
        FIGURE: "Training (dashed) and validation (bold) top-1 error per epoch; left plain, right residual",
        GRADIENT_FIGURE: "Per-layer gradient norm of the trained models on one val batch",
        GRADIENT_INIT_FIGURE: "The same at initialisation",
    }
    flow = record.get("gradient_flow", {})
    if flow.get("init"):
        ratios = []
        for arch, init in flow["init"].items():
            trained = flow.get("trained", {}).get(arch, {}).get("first_over_last")
            ratios.append(f"{arch} {_ratio(init['first_over_last'])} / {_ratio(trained)}")
        lines.append(
            "**Gradient flow** (section 4.1 argues that with BN the plain nets' trouble is not *vanishing* "
            f"gradients): gradient norm of the first over the last weighted layer on {flow['batch']} val images, "
            "at initialisation / after training: " + "; ".join(ratios) + ". Far below 1 = shrinking toward the "
            "input, far above 1 = growing.\n\n"
        )
    for figure in record["figures"]:
        lines.append(f"![{captions[figure]}]({figure})\n\n*{captions[figure]}.*\n\n")
    lines.append(f"Numbers: [`{CSV_FILE}`]({CSV_FILE}) (one row per model per epoch), [`{JSON_FILE}`]({JSON_FILE}). "
                 f"MLflow run `{record['mlflow_run_id']}` (one child run per model).\n")
    return "".join(lines)
