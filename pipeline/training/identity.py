"""What makes two training runs "the same run": the one definition DVC, Ray and MLflow share.

A training trajectory (the sequence of weights a run goes through) is fixed by the recipe, the model options,
the seed, the data and, for `train@ARCH`, that arch's own per-arch overrides. It is NOT changed by how or where
the run executes: evaluation batch size, fault tolerance, checkpoint storage, thread counts, tracking, registry.

From this one table:
- dvc.yaml lists, per stage, exactly `stage_params(stage)` as params (`python -m pipeline.dvcgen` writes them),
  so DVC reruns a stage only for an edit that changes its result;
- `train_run_name` / `tune_run_name` are Ray's run names (the resume key: a rerun with the same name picks up
  the last checkpoint) and the MLflow runs' `resume.key`, so an edit of anything else after a crash resumes
  instead of starting over.

Everything not listed here is a runtime knob. Deliberate choices:
- `train.num_workers` IS trajectory: the global batch is fixed, but batch norm sees per-worker batches and the
  data order depends on the ranks, so another worker count is another run. `train.cpus_per_worker` (threads),
  `train.use_gpu`, `train.channels_last`, `train.compile` and `model.checkpoint_activations` change where and
  how fast the same math runs (up to floating-point rounding), not the math.
- `tune.*` reaches `train@ARCH` only through tune/best.json (a file dependency): editing the search reruns the
  tune stage, and training only if best.json then changes.
- Per-arch overrides (`train.epochs_by_arch.ARCH`) are keyed by the arch, so `train@resnet152`'s entry leaves
  `train@resnet18` alone. DVC refuses a params dependency whose key is absent from params.yaml ("Parameters
  'train.epochs_by_arch.resnet34' are missing from 'params.yaml'"), before running anything: every arch of
  `model.archs` needs an entry, `null` meaning `train.epochs`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import Params
from pipeline.training.tuned import trial_recipe

ARCH = "{arch}"  # stands for the stage's arch; dvc.yaml writes it as ${item}

MODEL_OPTIONS = ("model.shortcut", "model.zero_init_residual", "model.dropout")

# The per-step math every training-like stage takes from `train` (optimiser, schedule shape, regularisation,
# precision, mixup/cutmix, crops). The validation crops also fix the exported model's eval transform.
RECIPE = (
    "train.opt", "train.momentum", "train.nesterov", "train.weight_decay", "train.norm_weight_decay",
    "train.label_smoothing", "train.lr_scheduler", "train.lr_step_size", "train.lr_gamma", "train.lr_warmup_decay",
    "train.lr_min", "train.clip_grad_norm", "train.amp", "train.mixup_alpha", "train.cutmix_alpha",
    "train.train_crop_size", "train.train_crop_min_scale", "train.val_resize_size", "train.val_crop_size",
)

# The augmentations after the crop and the seeding of a Ray Data run (pipeline.data.augment, ingest.TrainDecode):
# train and tune decode with them; the degradation experiment's in-process shard (training.local) does not.
AUGMENT = (
    "train.auto_augment", "train.ra_magnitude", "train.random_erase", "train.ra_sampler", "train.ra_reps",
    "train.prog_resize_min_size", "train.prog_resize_ramp_start", "train.prog_resize_ramp_end",
    "train.prog_resize_step", "train.deterministic", "train.train_scale_range", "train.pca_lighting",
)

# train@ARCH. train.lr / train.lr_warmup_epochs / train.use_tuned are listed because with use_tuned off (or no
# best.json) they are the run's hyperparameters; the run name uses the values actually trained with.
TRAIN = (
    "seed", *MODEL_OPTIONS, *RECIPE, *AUGMENT,
    "train.epochs", f"train.epochs_by_arch.{ARCH}", "train.batch_size", "train.lr", "train.lr_warmup_epochs",
    "train.use_tuned", "train.include_minival", "train.model_ema_decay", "train.model_ema_steps", "train.sync_bn",
    "train.num_workers", "train.pretrained",
)

# The lr/warmup search: trials train each of tune.archs with the recipe for tune.epochs at searched lr and
# warmup, so train.lr does not reach it. train.batch_size / train.num_workers is
# the final run's per-worker batch, which every trial trains with (pipeline.tuning.trial_batch). Every tune.*
# setting changes which trials run or stop, hence best.json. Which train images are held out (minival) is data:
# data/dataset.json.
TUNE = (
    "seed", *MODEL_OPTIONS, *RECIPE, *AUGMENT,
    # (train.model_ema_decay is not here: trials are scored without EMA.)
    "train.batch_size", "train.num_workers", "train.sync_bn", "train.pretrained",
    "tune.archs", "tune.num_samples", "tune.epochs", "tune.lr_per_256_low", "tune.lr_per_256_high",
    "tune.lr_warmup_epochs", "tune.grace_period", "tune.reduction_factor", "tune.max_concurrent_trials",
    "tune.workers_per_trial", "tune.train_fraction", "tune.time_budget_s",
    # A trial is the final schedule compressed (pipeline.training.tuned.trial_recipe): the step schedule's drops
    # and, when warmup is not searched, the recipe's warmup come from the final run's epochs; use_tuned false = a
    # stub.
    "train.epochs", "train.lr_warmup_epochs", "train.use_tuned",
)
# TUNE keys that reach a search only through its resolved trial schedule (tune_identity).
_TUNE_RESOLVED = ("train.epochs", "train.lr_warmup_epochs", "train.use_tuned")

# The in-process plain-vs-residual experiment: its own section replaces epochs, batch, lr, warmup and the model
# options (pipeline.analysis.degradation.recipe_params); degradation.threads is a thread count.
DEGRADATION = (
    "seed", *RECIPE,
    "train.include_minival",  # its runs read train + minival like train@ARCH (pipeline.training.trainer.make_job)
    "degradation.enabled", "degradation.archs", "degradation.epochs", "degradation.batch_size", "degradation.lr",
    "degradation.lr_warmup_epochs", "degradation.train_images", "degradation.shortcut",
    "degradation.zero_init_residual", "degradation.grad_batch",
)

# The evaluation's result is the protocol and its precision; eval.batch_size and eval.ray_min_images (where it
# runs) are not.
EVALUATE = ("eval.ten_crop", "eval.precision")

STAGES: dict[str, tuple[str, ...]] = {"train": TRAIN, "tune": TUNE, "degradation": DEGRADATION,
                                      "evaluate": EVALUATE}

# The rest of `model`, `train` and `eval`, named so that a new field must be put on one side or the other
# (tests/test_identity.py): these change how or where a run executes, or what is recorded, not its result.
RUNTIME = (
    "model.archs",  # which train@ARCH stages exist; each depends on its own arch only
    "model.checkpoint_activations",  # recomputes activations in backward: same math, less memory
    "train.channels_last", "train.compile",  # memory layout and kernels: same math up to rounding
    "train.cpus_per_worker",  # the workers' torch threads
    "train.use_gpu",  # the device
    "train.decode",  # where the JPEGs decode: the same draws and crops either way (tests/test_jpeg_decode.py)
    "train.max_failures", "train.storage_path",  # fault tolerance and where checkpoints live
    "train.log_grad_stats", "train.grad_stats_every_epochs",  # measured with buffers restored
    "train.val_every_epochs",  # how often validation is recorded (the last epoch always is): not the weights
    "eval.batch_size", "eval.ray_min_images", "eval.gpus_per_actor", "eval.max_actors",  # where inference runs
)


def stage_params(stage: str, arch: str | None = None) -> list[str]:
    """The params that determine `stage`'s result, as dotted keys; `arch` fills in per-arch keys (None keeps
    the `{arch}` placeholder). Raises KeyError naming the stage for a stage without trajectory params."""
    if stage not in STAGES:
        raise KeyError(f"no trajectory params defined for stage {stage!r}; known: {sorted(STAGES)}")
    keys = STAGES[stage]
    return list(keys) if arch is None else [k.replace(ARCH, arch) for k in keys]


def value(p: Params, key: str) -> Any:
    """The value of a dotted key (`train.epochs_by_arch.resnet18`) in `p`, JSON-typed; None when a dict entry
    is absent. Raises KeyError naming the key when a section or field does not exist."""
    node: Any = p.model_dump(mode="json")
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, dict):
            raise KeyError(f"{key}: {'.'.join(key.split('.')[:i])} is not a section")
        if part not in node:
            parent = ".".join(key.split(".")[:i])
            if parent in _DICT_FIELDS:
                return None
            raise KeyError(f"{key}: no such parameter")
        node = node[part]
    return node


_DICT_FIELDS = {"train.epochs_by_arch"}


def _key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_identity(p: Params, arch: str, *, lr: float, lr_warmup_epochs: int, data_fingerprint: str) -> dict[str, Any]:
    """The values that fix `arch`'s trajectory: the TRAIN params, with the raw lr/warmup/epochs replaced by what
    the run actually uses (`lr`, `lr_warmup_epochs`: tune/best.json's when train.use_tuned; the arch's epochs),
    plus the arch and the shards' fingerprint. Editing train.lr while the tuned lr is used keeps the identity."""
    keys = [k for k in stage_params("train", arch)
            if k not in ("train.lr", "train.lr_warmup_epochs", "train.use_tuned", "train.epochs",
                         f"train.epochs_by_arch.{arch}")]
    identity = {k: value(p, k) for k in keys}
    identity.update({"arch": arch, "epochs": p.train.epochs_for(arch), "lr": float(lr),
                     "lr_warmup_epochs": int(lr_warmup_epochs), "data_fingerprint": str(data_fingerprint)})
    return identity


def train_run_name(p: Params, arch: str, *, lr: float, lr_warmup_epochs: int, data_fingerprint: str) -> str:
    """Ray's run name for train@ARCH (and the MLflow run's resume key): the same trajectory, the same name."""
    ident = train_identity(p, arch, lr=lr, lr_warmup_epochs=lr_warmup_epochs, data_fingerprint=data_fingerprint)
    return f"train-{arch}-{_key(ident)}"


def tune_identity(p: Params, arch: str, data_fingerprint: str) -> dict[str, Any]:
    """The values that fix `arch`'s search: the TUNE params without the list of tuned archs (adding an arch to
    tune.archs does not restart the others' searches), plus the arch and the shards' fingerprint."""
    ident = {k: value(p, k) for k in stage_params("tune") if k != "tune.archs" and k not in _TUNE_RESOLVED}
    # The final run's epochs and warmup as the trials see them: an edit that leaves the trials alone keeps the name.
    recipe, warmup = trial_recipe(p.train, arch, p.tune.epochs)
    return {**ident, "trial_recipe": recipe, "trial_warmup": warmup if p.tune.lr_warmup_epochs is None else None,
            "arch": arch, "data_fingerprint": str(data_fingerprint)}


def tune_run_name(p: Params, arch: str, data_fingerprint: str) -> str:
    """Ray Tune's experiment name of `arch`'s search (an interrupted search with this name is restored)."""
    return f"tune-{arch}-{_key(tune_identity(p, arch, data_fingerprint))}"
