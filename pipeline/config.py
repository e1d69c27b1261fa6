"""The one schema of params.yaml. Unknown keys fail (ffcv's dead `bn_wd` is why), every field is bounded.

Field names follow torchvision's classification recipe flags (label_smoothing, lr_warmup_epochs,
train_crop_size, val_resize_size, norm_weight_decay) so published recipes map one to one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ParamsError(ValueError):
    """A parameter file or override is wrong; the message names the file and the key."""


def _check_archs(archs: list[str]) -> list[str]:
    """Every name is a model we build, and none repeats (a repeated arch would train twice into one folder)."""
    from pipeline.models import MODELS  # local: keep `import pipeline.config` light

    unknown = [a for a in archs if a not in MODELS]
    if unknown:
        raise ValueError(f"unknown arch {unknown}; choose from {sorted(MODELS)}")
    if len(set(archs)) != len(archs):
        raise ValueError("archs must not repeat a model")
    return archs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(_Section):
    num_classes: int = Field(10, ge=2, le=1000, description="Number of synthetic classes.")
    train_per_class: int = Field(100, ge=1, le=100_000, description="Train images per class.")
    val_per_class: int = Field(20, ge=1, le=10_000, description="Val images per class.")
    image_size: int = Field(48, ge=16, le=1024, description="Side of the generated square images (px).")


class DataParams(_Section):
    source: Literal["auto", "synthetic", "kaggle", "folders", "imagefolder", "ilsvrc_tar"] = Field(
        "auto", description="Raw layout; auto detects it from raw_dir."
    )
    raw_dir: str = Field("data/synthetic", description="The raw dataset folder (dependency by path).")
    shards_dir: str = Field("data/shards", description="Where prepare writes Parquet shards + manifest.")
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    classes: list[str] = Field(default_factory=list, description="Subset by wnid; empty = all.")
    first_n_classes: int | None = Field(None, ge=1, description="Keep the first N classes (sorted wnids).")
    max_per_class: int | None = Field(None, ge=1, description="Cap on train images per class.")
    max_side: int = Field(512, ge=16, le=8192, description="Re-encode images whose longer side is larger.")
    jpeg_quality: int = Field(90, ge=50, le=100, description="Quality used when re-encoding.")
    rows_per_shard: int = Field(1024, ge=1, le=1_000_000, description="Images per Parquet shard.")
    workers: int = Field(2, ge=1, le=512, description="Prepare processes.")
    prepare_on: Literal["auto", "local", "ray"] = Field(
        "auto", description="Where prepare runs: a local process pool, or one task per shard on the Ray cluster; "
        "auto = Ray when RAY_ADDRESS is set. Never changes the output."
    )
    max_rejected: float = Field(0.001, ge=0, description="<1: fraction of inputs; >=1: a count.")


class ModelParams(_Section):
    archs: list[str] = Field(
        default_factory=lambda: ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
        min_length=1,
        description="Architectures trained by the train@ARCH foreach stage.",
    )
    shortcut: Literal["A", "B", "C"] | None = Field(
        None, description="The paper's shortcut option (sec. 3.3); null = the builder's default (B, CIFAR: A)."
    )
    zero_init_residual: bool = Field(False, description="Zero each block's last BN weight.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before fc.")
    checkpoint_activations: bool = Field(False, description="Recompute block activations in backward.")

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        return _check_archs(archs)


class TrainParams(_Section):
    epochs: int = Field(90, ge=1, le=10_000, description="Training epochs (the paper: 90).")
    epochs_by_arch: dict[str, int | None] = Field(
        default_factory=dict,
        description="Per-arch epochs overriding `epochs` (e.g. a shorter smoke run for the deepest nets); null = "
        "`epochs`. dvc.yaml's train@ARCH depends on the ARCH entry alone, so under DVC every arch of model.archs "
        "needs one.",
    )
    batch_size: int = Field(256, ge=1, le=1 << 20, description="GLOBAL batch size, fixed for any worker count.")
    opt: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, le=100, description="Peak LR for batch_size (paper: 0.1 at 256).")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0, le=1)
    norm_weight_decay: float | None = Field(None, ge=0, le=1, description="Decay of norm/bias; null = weight_decay.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "step"] = "step"
    lr_step_size: int = Field(30, ge=1)
    lr_gamma: float = Field(0.1, gt=0, le=1)
    lr_warmup_epochs: int = Field(0, ge=0)
    lr_warmup_decay: float = Field(0.01, gt=0, le=1)
    lr_min: float = Field(0.0, ge=0)
    clip_grad_norm: float | None = Field(None, gt=0)
    amp: Literal["bf16", "fp16", "off"] = "bf16"
    channels_last: bool = True
    compile: bool = False
    sync_bn: bool = False
    model_ema_decay: float = Field(0.0, ge=0, lt=1, description="0 = no EMA.")
    mixup_alpha: float = Field(0.0, ge=0)
    cutmix_alpha: float = Field(0.0, ge=0)
    auto_augment: Literal["ta_wide", "ra"] | None = Field(
        None, description="Automatic augmentation policy applied to each train crop (uint8, after the flip): "
        "ta_wide = TrivialAugmentWide, ra = RandAugment with 2 ops at ra_magnitude; null = none."
    )
    ra_magnitude: int = Field(
        9, ge=0, le=30, description="RandAugment's magnitude (of 31 bins) when auto_augment is ra (torchvision: 9)."
    )
    random_erase: float = Field(
        0.0, ge=0, le=1, description="Probability of erasing one random rectangle (2-33% of the area) of a train "
        "crop to the mean pixel (Zhong et al. 2017; torchvision's modern recipe: 0.1); 0 = off."
    )
    ra_sampler: bool = Field(
        False, description="Repeated augmentation (Hoffer et al. 2020, DeiT's RASampler): every image is decoded "
        "ra_reps times per epoch with different augmentations, and an epoch keeps its length (n images), so it "
        "holds n / ra_reps distinct images."
    )
    ra_reps: int = Field(3, ge=2, le=16, description="Copies of each image per epoch when ra_sampler is on.")
    prog_resize_min_size: int | None = Field(
        None, ge=8, le=4096, description="Progressive resizing (FFCV): the train crop of the first epochs, ramped "
        "up to train_crop_size between prog_resize_ramp_start and prog_resize_ramp_end; null = train_crop_size "
        "every epoch."
    )
    prog_resize_ramp_start: float = Field(
        0.0, ge=0, le=1, description="Where the progressive-resizing ramp starts, as a fraction of the epochs."
    )
    prog_resize_ramp_end: float = Field(
        0.85, ge=0, le=1, description="Where the progressive-resizing ramp reaches train_crop_size, as a fraction "
        "of the epochs (FFCV's ResNet-50 recipes: ~0.85)."
    )
    prog_resize_step: int = Field(
        32, ge=1, le=512, description="Progressive sizes are rounded to a multiple of this (32: the network's "
        "stride, so every stage's feature map stays whole)."
    )
    deterministic: bool = Field(
        False, description="Bit-for-bit repeatable runs on the same hardware and worker count: augmentation "
        "seeded per (seed, epoch, image) instead of OS entropy, Ray Data's row order preserved, torch's "
        "deterministic algorithms (cudnn.benchmark off). Costs throughput (docs/recipes.md, reports/bench.json)."
    )
    train_crop_size: int = Field(
        224, ge=8, le=4096, description="Side of the train crops (RandomResizedCrop); with progressive resizing, "
        "the size the ramp ends at."
    )
    train_crop_min_scale: float = Field(0.08, gt=0, le=1)
    val_resize_size: int = Field(
        256, ge=8, le=4096, description="Evaluation: the shorter side is resized to this before the center crop."
    )
    val_crop_size: int = Field(
        224, ge=8, le=4096, description="Evaluation's center crop: the test-time resolution (FixRes: above "
        "train_crop_size, e.g. train 176 / eval 224; the registered model accepts any size)."
    )
    val_every_epochs: int = Field(
        1, ge=1, le=10_000, description="Validate every N epochs (and always after the last); epochs between "
        "report the last validation's errors."
    )
    use_tuned: bool = Field(True, description="Take lr and lr_warmup_epochs from tune/best.json.")
    num_workers: int = Field(2, ge=0, le=4096, description="Ray Train workers; 0 = in-process (tests).")
    cpus_per_worker: float = Field(
        1.0, gt=0, le=512, description="CPUs reserved per training worker (also its torch threads). A GPU worker "
        "needs 1-2: decoding runs in Ray Data tasks on the node's other CPUs."
    )
    use_gpu: bool = False
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts; -1 = forever.")
    storage_path: str = Field("ray_results", description="Checkpoint root: path or URI.")
    pretrained: str | None = Field(
        None, description="Fine-tune from torchvision's ImageNet weights: 'torchvision' (looked up in torch.hub's "
        "cache, never downloaded) or a .pth path; null = train from scratch."
    )
    log_grad_stats: bool = Field(
        False,
        description="Log per-layer weight-gradient L2 norms (grad_norm/*) and dead-ReLU ratios (dead_relu/*) "
        "to MLflow with the epoch metrics; measured on one batch, so off costs nothing.",
    )
    grad_stats_every_epochs: int = Field(
        1, ge=1, le=10_000, description="With log_grad_stats: measure in every N-th epoch (on its last batch)."
    )

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False: accept what the user meant.
        return "off" if v is False else v

    def epochs_for(self, arch: str) -> int:
        epochs = self.epochs_by_arch.get(arch)
        return self.epochs if epochs is None else epochs

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if any(e is not None and e < 1 for e in self.epochs_by_arch.values()):
            raise ValueError("epochs_by_arch values must be >= 1")
        if self.prog_resize_min_size is not None and self.prog_resize_min_size > self.train_crop_size:
            raise ValueError("prog_resize_min_size must be <= train_crop_size (the ramp ends there)")
        if self.prog_resize_ramp_start > self.prog_resize_ramp_end:
            raise ValueError("prog_resize_ramp_start must be <= prog_resize_ramp_end")
        if self.val_crop_size > self.val_resize_size:
            raise ValueError("val_crop_size must be <= val_resize_size")
        if self.lr_warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError("lr_warmup_epochs must be smaller than epochs")
        return self


class EvalParams(_Section):
    batch_size: int = Field(256, ge=1, le=1 << 20)
    ten_crop: bool = Field(False, description="The paper's 10-crop test (sec. 3.4) instead of 1 center crop.")
    ray_min_images: int = Field(
        5000, ge=0, description="Val sets of at least this many images run as Ray Data batch inference over the "
        "cluster; smaller ones in the stage's own process (Ray's start-up and actor pool cost ~15 s, more than "
        "evaluating a few hundred images). 0 = always Ray."
    )


    gpus_per_actor: float = Field(
        1.0, ge=0, le=8, description="GPUs per inference actor when train.use_gpu or the cluster has GPUs "
        "(a fraction shares one GPU between actors); 0 = CPU inference."
    )
    max_actors: int | None = Field(
        None, ge=1, le=4096, description="Most inference actors; null = one per GPU share (GPU) or per 2 CPUs."
    )


class TuneParams(_Section):
    arch: str = "resnet18"
    num_samples: int = Field(8, ge=1, le=10_000)
    epochs: int = Field(3, ge=1, le=1000, description="Max epochs per trial (ASHA's max_t).")
    lr_low: float = Field(0.01, gt=0)
    lr_high: float = Field(1.0, gt=0)
    lr_warmup_epochs: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int | None = Field(None, ge=1)
    workers_per_trial: int = Field(
        0, ge=0, le=4096,
        description="Ray Train workers per trial; 0 = the trial trains in its own process (cheap start-up on "
        "small machines), >= 1 = a worker group reporting through TuneReportCallback.",
    )
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the train shards a trial reads (shards hold mixed classes)."
    )
    time_budget_s: float = Field(600, gt=0, description="Tuner stops starting/continuing trials after this.")

    @model_validator(mode="after")
    def _bounds(self) -> TuneParams:
        if self.lr_low >= self.lr_high:
            raise ValueError("lr_low must be < lr_high")
        if any(w < 0 or w >= self.epochs for w in self.lr_warmup_epochs):
            raise ValueError("every lr_warmup_epochs choice must be in [0, epochs)")
        return self


class DegradationParams(_Section):
    """The degradation experiment (He et al. 2015, section 4.1 Fig. 4; section 4.2 Fig. 6): plain and residual
    networks of two depths trained in-process with one recipe. Settings not listed here come from `train`."""

    # Off unless a params file turns it on: a preset without this section (configs/) must not start training
    # four extra networks on ImageNet-size shards.
    enabled: bool = Field(False, description="false: the stage only writes a summary saying it was switched off.")
    archs: list[str] = Field(
        default_factory=lambda: ["plain20", "plain56", "resnet20", "resnet56"],
        min_length=2,
        description="Models compared, plain (name containing 'plain') and residual; all get the same recipe.",
    )
    epochs: int = Field(4, ge=1, le=1000, description="Epochs per model.")
    batch_size: int = Field(64, ge=1, le=1 << 16, description="Batch size (one process).")
    lr: float = Field(0.1, gt=0, le=100, description="Peak LR (the paper's CIFAR recipe: 0.1).")
    lr_warmup_epochs: int = Field(0, ge=0, description="Linear warmup epochs (the paper warms up only ResNet-110).")
    train_images: int | None = Field(None, ge=1, description="Train images per epoch (first N rows); null = all.")
    threads: int = Field(2, ge=1, le=512, description="torch intra-op threads of the in-process run.")
    shortcut: Literal["A", "B", "C"] = Field(
        "A", description="Residual nets' shortcut option (sec. 3.3); A = zero-padding, no extra parameters, as in "
        "the paper's plain-vs-residual comparisons (Fig. 4 right, Fig. 6)."
    )
    zero_init_residual: bool = Field(
        False, description="Zero each block's last BN weight; false = the paper's init (plain nets have no such "
        "option, so true would give the ResNets a head start)."
    )
    grad_batch: int = Field(16, ge=1, le=4096, description="Val images in the gradient-flow comparison batch.")

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        return _check_archs(archs)

    @model_validator(mode="after")
    def _warmup(self) -> DegradationParams:
        if self.lr_warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError("lr_warmup_epochs must be smaller than epochs")
        return self


class RegistryParams(_Section):
    model_name: str = Field("{arch}-{dataset}", description="Registered name; {arch} and {dataset} filled in.")
    alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")


class TrackingParams(_Section):
    experiment: str = Field("resnet-pipeline", min_length=1)


class ClusterParams(_Section):
    """How stages get their resources; never changes a result (no DVC stage depends on it)."""

    wait_for_resources_s: float = Field(
        900, ge=0, le=86_400, description="On a cluster that can grow (RAY_ADDRESS set): how long a stage waits "
        "for the autoscaler to bring up what it asked for before it stops naming what is missing."
    )


class Params(_Section):
    seed: int = Field(0, ge=0)
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    degradation: DegradationParams = Field(default_factory=DegradationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    cluster: ClusterParams = Field(default_factory=ClusterParams)

    def digest(self) -> str:
        """A short hash of the resolved parameters (tagged on every MLflow run)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ParamsError(f"{source}: --set {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ("train.lr", 0.05); the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=0.05")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] | Sequence[str] = ()) -> Params:
    """Read `path`, apply `--set`-style overrides, validate. Raises ParamsError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, str(path))
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ParamsError(f"{path}: " + "; ".join(problems)) from None


def with_absolute_paths(p: Params, root: str | Path = ".") -> Params:
    """Resolve relative data/checkpoint paths against `root`: Ray workers and Tune trials run in other
    working directories. URIs (s3://, gs://, file://) are left as they are."""

    def fix(path: str) -> str:
        return path if "://" in path else str((Path(root) / path).resolve())

    data = p.data.model_copy(update={"raw_dir": fix(p.data.raw_dir), "shards_dir": fix(p.data.shards_dir)})
    train = p.train.model_copy(update={"storage_path": fix(p.train.storage_path)})
    return p.model_copy(update={"data": data, "train": train})
