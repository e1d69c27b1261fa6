"""The one schema of params.yaml. Unknown keys fail (ffcv's dead `bn_wd` is why), every field is bounded.

Field names follow torchvision's classification recipe flags (label_smoothing, lr_warmup_epochs,
train_crop_size, val_resize_size, norm_weight_decay) so published recipes map one to one.

params.yaml is the one home of defaults: every default below equals params.yaml's value for its key, and
params.yaml sets every key (tests/test_defaults.py). The schema keeps its defaults so that a section built in
code (`TrainParams(batch_size=16)` in a test or bench) gets the documented value and docs/parameters.md can list
it; change a default in both places at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.archs import ARCHS, lr_source_arch, network_kind


class ParamsError(ValueError):
    """A parameter file or override is wrong; the message names the file and the key."""


def _check_archs(archs: list[str]) -> list[str]:
    """Every name is a model we build, and none repeats (a repeated arch would train twice into one folder)."""
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise ValueError(f"unknown arch {unknown}; choose from {sorted(ARCHS)}")
    if len(set(archs)) != len(archs):
        raise ValueError("archs must not repeat a model")
    return archs


# Hosts (buckets) that documentation and examples write where the user's own goes: a run with one of them starts,
# trains an epoch, and only then fails at its first checkpoint or shard write. Refused when params load instead.
# Compared lower-cased with '_' read as '-'; RFC 2606's example domains (and their subdomains) too.
PLACEHOLDER_HOSTS = frozenset({
    "my-bucket", "your-bucket", "mybucket", "yourbucket", "my-bucket-name", "your-bucket-name", "bucket-name",
    "example", "example-bucket", "changeme", "change-me", "replace-me", "todo", "xxx",
})
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
_ANGLE = re.compile(r"<[^<>]*>")  # `<bucket>`, `<your-bucket>`: a slot to fill in


def placeholder_problem(value: str) -> str | None:
    """Why `value` (a path or URI of a storage key) is a placeholder, or None for a real location.

    A URI (`scheme://host/...`) is one when its host is empty (`s3:///x`; `file:///abs` is a real local path) or
    one of PLACEHOLDER_HOSTS / an example domain; any value holding `<...>` or a host made of dots (`s3://...`)
    is one too. Local paths are otherwise left alone (any name can be a real folder)."""
    slot = _ANGLE.search(value)
    if slot:
        return f"{slot.group(0)} is a slot to fill in"
    if "://" not in value:
        return None
    parts = urlsplit(value)
    host = (parts.hostname or "").lower().replace("_", "-")
    if not host:
        return None if parts.scheme.lower() == "file" else "its host (bucket) is empty"
    if host in PLACEHOLDER_HOSTS or set(host) == {"."}:
        return f"{host!r} is a placeholder bucket"
    if any(host == d or host.endswith("." + d) for d in _EXAMPLE_DOMAINS):
        return f"{host!r} is a documentation example domain"
    return None


def _refuse_placeholder(key: str, value: str, what: str) -> str:
    """`value` unchanged, or ValueError in one line naming the key, the value (credentials masked) and what to
    put there instead."""
    why = placeholder_problem(value)
    if why is None:
        return value
    shown = re.sub(r"(://)[^/\s]*@", r"\1***@", value)
    raise ValueError(f"{key}: {shown!r} is a placeholder ({why}): set it to {what}")


_STORAGE_WHAT = {
    "data.raw_dir": "the folder (or URI) of the raw dataset, e.g. /datasets/imagenet",
    "data.shards_dir": "a local folder (data/shards) or a bucket you own that every node reaches, "
                       "e.g. s3://<the real bucket>/resnet-pipeline/shards",
    "train.storage_path": "a local folder (ray_results) on one machine, or a bucket you own that every node "
                          "reaches, e.g. s3://<the real bucket>/resnet-pipeline/checkpoints (docs/cluster.md)",
    "train.pretrained": "'torchvision', a .pth path, or null",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(_Section):
    num_classes: int = Field(10, ge=2, le=1000, description="Number of synthetic classes.")
    train_per_class: int = Field(80, ge=1, le=100_000, description="Train images per class.")
    val_per_class: int = Field(20, ge=1, le=10_000, description="Val images per class.")
    image_size: int = Field(48, ge=16, le=1024, description="Side of the generated square images (px).")


class DataParams(_Section):
    source: Literal["auto", "synthetic", "kaggle", "folders", "imagefolder", "ilsvrc_tar"] = Field(
        "synthetic", description="Raw layout; auto detects it from raw_dir."
    )
    raw_dir: str = Field("data/synthetic", description="The raw dataset folder (dependency by path).")
    shards_dir: str = Field("data/shards", description="Where prepare writes Parquet shards + manifest.")
    synthetic: SyntheticParams = Field(default_factory=SyntheticParams)
    classes: list[str] = Field(default_factory=list, description="Subset by wnid; empty = all.")
    first_n_classes: int | None = Field(None, ge=1, description="Keep the first N classes (sorted wnids).")
    max_per_class: int | None = Field(None, ge=1, description="Cap on train images per class.")
    max_side: int = Field(
        64, ge=16, le=8192,
        description="Re-encode train and minival images whose longer side is larger (val keeps its original bytes)."
    )
    max_pixels: int = Field(
        50_000_000, ge=1, le=178_956_970, description="Pixel budget per raw image (width x height from its header, "
        "before decoding): a larger one is rejected into rejected.csv, never decoded (a 657 KB PNG can expand to "
        "169 Mpx, 2 GB). Pillow decodes with only a warning up to twice its 89.5 Mpx limit and refuses above, "
        "hence the bound."
    )
    jpeg_quality: int = Field(90, ge=50, le=100, description="Quality used when re-encoding.")
    restart_markers: Literal["none", "rows", "mcu"] = Field(
        "none", description="Losslessly transcode each train JPEG with restart markers (same DCT coefficients, "
        "same decoded pixels; optimised Huffman tables): `mcu` one restart interval per MCU, so a crop's "
        "Huffman decoding follows the box's area (stream surgery, pipeline.data.jpeg.decode_region_restart); "
        "`rows` one per MCU row; `none` keeps the bytes. val and minival always keep theirs."
    )
    rows_per_shard: int = Field(256, ge=1, le=1_000_000, description="Images per Parquet shard.")
    workers: int = Field(2, ge=1, le=512, description="Prepare processes.")
    prepare_on: Literal["auto", "local", "ray"] = Field(
        "auto", description="Where prepare runs: a local process pool, or one task per shard on the Ray cluster; "
        "auto = Ray when RAY_ADDRESS is set. Never changes the output."
    )
    max_rejected: float = Field(0.01, ge=0, description="<1: fraction of inputs; >=1: a count.")
    minival_per_class: int = Field(
        5, ge=0, le=100_000, description="Train images per class that prepare holds out as the `minival` "
        "split (seeded, class-balanced): what tune selects lr and warmup on, so the val set is only ever "
        "evaluated; 0 = no minival (the tune stage then refuses to run)."
    )
    minival_seed: int = Field(
        0, ge=0, description="Seed of the minival draw (which train images of each class are held out)."
    )

    @field_validator("raw_dir", "shards_dir")
    @classmethod
    def _no_placeholder(cls, v: str, info: Any) -> str:
        key = f"data.{info.field_name}"
        return _refuse_placeholder(key, v, _STORAGE_WHAT[key])


class ModelParams(_Section):
    archs: list[str] = Field(
        default_factory=lambda: ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
        min_length=1,
        description="Architectures trained by the train@ARCH foreach stage.",
    )
    shortcut: Literal["A", "B", "C"] | None = Field(
        None, description="The paper's shortcut option (sec. 3.3); null = the builder's default (B, CIFAR: A)."
    )
    zero_init_residual: bool = Field(True, description="Zero each block's last BN weight.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before fc.")
    checkpoint_activations: bool = Field(False, description="Recompute block activations in backward.")

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        return _check_archs(archs)


class TrainParams(_Section):
    epochs: int = Field(5, ge=1, le=10_000, description="Training epochs (the paper: 90).")
    epochs_by_arch: dict[str, int | None] = Field(
        default_factory=lambda: {"resnet18": None, "resnet34": None, "resnet50": 3, "resnet101": 2, "resnet152": 2},
        description="Per-arch epochs overriding `epochs` (e.g. a shorter smoke run for the deepest nets); null = "
        "`epochs`. dvc.yaml's train@ARCH depends on the ARCH entry alone, so under DVC every arch of model.archs "
        "needs one.",
    )
    batch_size: int = Field(64, ge=1, le=1 << 20, description="GLOBAL batch size, fixed for any worker count.")
    opt: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser: SGD with momentum (the paper) or AdamW.")
    lr: float = Field(0.1, gt=0, le=100, description="Peak LR for batch_size (paper: 0.1 at 256).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (the paper: 0.9).")
    nesterov: bool = Field(False, description="Nesterov momentum for SGD.")
    weight_decay: float = Field(
        5e-5, ge=0, le=1, description="L2 weight decay of conv/linear weights (the paper: 1e-4)."
    )
    norm_weight_decay: float | None = Field(0.0, ge=0, le=1, description="Decay of norm/bias; null = weight_decay.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy (torchvision's modern recipe: 0.1)."
    )
    lr_scheduler: Literal["cosine", "linear", "step"] = Field(
        "cosine", description="After warmup: step decay (the paper: /10 every 30 epochs), cosine down to lr_min, or "
        "linear down to lr_min at the last step (FFCV's ImageNet schedule, with lr_warmup_decay 1e-4)."
    )
    lr_step_size: int = Field(30, ge=1, description="Epochs between step decays (lr_scheduler: step).")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="Factor of each step decay (lr_scheduler: step).")
    lr_warmup_epochs: int = Field(
        1, ge=0, description="Linear warmup epochs before the schedule (Goyal et al.: 5 above batch 256)."
    )
    lr_warmup_decay: float = Field(0.01, gt=0, le=1, description="Warmup starts at lr x this factor.")
    lr_min: float = Field(0.0, ge=0, description="Final lr of the cosine schedule.")
    clip_grad_norm: float | None = Field(
        5.0, gt=0, description="Clip the global gradient L2 norm to this; null = no clipping."
    )
    amp: Literal["none", "bf16", "fp16"] = Field(
        "none", description="Autocast dtype for training and its validation: none (fp32), bf16, or fp16 (adds a "
        "GradScaler); the evaluate stage uses eval.precision. Never `off`: YAML 1.1 (PyYAML) reads it as false, "
        "YAML 1.2 (DVC) as the string \"off\"."
    )
    channels_last: bool = Field(
        True, description="NHWC memory format for model and batches (faster convolutions on GPUs)."
    )
    compile: bool = Field(False, description="torch.compile the model (a one-off compile cost per worker).")
    sync_bn: bool = Field(False, description="SyncBatchNorm across workers (GPUs only; ignored with a message on CPU).")
    model_ema_decay: float = Field(
        0.0, ge=0, lt=1, description="EMA of the weights, torchvision's --model-ema-decay (their recipe: 0.99998): "
        "each update's decay is 1 - min(1, (1 - this) x batch_size x model_ema_steps / epochs), and the average "
        "restarts at every update of the warmup epochs; 0 = no EMA."
    )
    model_ema_steps: int = Field(
        32, ge=1, le=1 << 20, description="With model_ema_decay: update the EMA every N optimizer steps of an "
        "epoch (torchvision's --model-ema-steps, default 32)."
    )
    mixup_alpha: float = Field(0.0, ge=0, description="Mixup Beta(alpha, alpha); 0 = off.")
    cutmix_alpha: float = Field(
        0.0, ge=0, description="CutMix Beta(alpha, alpha); 0 = off (with mixup, one of the two per batch)."
    )
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
    pca_lighting: float = Field(
        0.0, ge=0, le=1, description="Std of AlexNet's PCA colour augmentation (Krizhevsky et al. 2012; the paper's "
        "sec. 3.4 uses it: 0.1): each train crop shifted along ImageNet's RGB principal components, after the "
        "auto_augment policy; 0 = off."
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
        32, ge=8, le=4096, description="Side of the train crops (RandomResizedCrop); with progressive resizing, "
        "the size the ramp ends at."
    )
    train_scale_range: list[int] | None = Field(
        None, description="The paper's scale augmentation (sec. 3.4): [lo, hi] = each train image resized so its "
        "shorter side is an integer drawn uniformly from lo..hi (the paper: [256, 480]), then a random "
        "train_crop_size crop and flip; null = RandomResizedCrop (train_crop_min_scale)."
    )
    train_crop_min_scale: float = Field(
        0.35, gt=0, le=1, description="Smallest crop area as a fraction of the image (RandomResizedCrop's scale[0])."
    )
    decode: Literal["auto", "tasks", "worker"] = Field(
        "tasks", description="Where train JPEGs are decoded: 'auto' = 'worker' on GPU workers whose CPUs left for "
        "decoding fall below DECODE_CPUS_PER_GPU (derived from the measured CPU decode cost, docs/performance.md), "
        "else 'tasks' (also on CPU-only runs and with a key the worker path does not apply), chosen at start-up "
        "and printed in one line; 'tasks' = Ray Data CPU tasks (region-of-interest "
        "decoding when built) ship uint8 crops; 'worker' = Ray Data ships the JPEG bytes and drawn crop boxes and "
        "each training worker decodes its batches on its device (nvJPEG on a GPU, its own CPU threads otherwise), "
        "overlapped with the previous step (docs/performance.md). The worker path does not apply auto_augment, "
        "random_erase, ra_sampler, progressive resizing or deterministic yet (refused with it)."
    )
    val_resize_size: int = Field(
        36, ge=8, le=4096, description="Evaluation: the shorter side is resized to this before the center crop."
    )
    val_crop_size: int = Field(
        32, ge=8, le=4096, description="Evaluation's center crop: the test-time resolution (FixRes: above "
        "train_crop_size, e.g. train 176 / eval 224; the registered model accepts any size)."
    )
    val_every_epochs: int = Field(
        1, ge=1, le=10_000, description="Validate every N epochs (and always after the last); epochs between "
        "report the last validation's errors."
    )
    use_tuned: bool = Field(
        True, description="Take lr and lr_warmup_epochs from tune/best.json: the arch's own tuned entry, else "
        "the tuned arch of the same kind (family and block) nearest in depth (docs/tuning.md)."
    )
    include_minival: bool = Field(
        True, description="Final training reads the full train set (train plus the minival split tune selected "
        "on); false = train minus minival, the data the tune trials trained on."
    )
    num_workers: int = Field(1, ge=0, le=4096, description="Ray Train workers; 0 = in-process (tests).")
    cpus_per_worker: float = Field(
        2.0, gt=0, le=512, description="CPUs reserved per training worker (also its torch threads). A GPU worker "
        "needs 1-2: decoding runs in Ray Data tasks on the node's other CPUs."
    )
    use_gpu: bool = Field(False, description="One GPU per training worker (NCCL); evaluation then uses GPUs too.")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts after a worker or node loss; -1 = forever. "
                              "Divergence and refused data are never retried.")
    storage_path: str = Field(
        "ray_results", description="Checkpoint root: a local path or a URI every node reaches (s3://, gs://). "
        "Placeholders (my-bucket, your-bucket, example, example.com, <...>, an empty host) are refused when "
        "params load (pipeline.config.placeholder_problem)."
    )
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

    @field_validator("storage_path", "pretrained")
    @classmethod
    def _no_placeholder(cls, v: str | None, info: Any) -> str | None:
        key = f"train.{info.field_name}"
        return v if v is None else _refuse_placeholder(key, v, _STORAGE_WHAT[key])

    @field_validator("amp", mode="before")
    @classmethod
    def _no_yaml_off(cls, v: Any) -> Any:
        # `off` read as False by PyYAML and as "off" by DVC's YAML 1.2 parser would give one file two meanings
        # (and two training identities): refused with the spelling to use instead.
        if v is False or v is None or (isinstance(v, str) and v.lower() in ("off", "false", "no", "fp32")):
            raise ValueError(f"{v!r} is an old, ambiguous spelling of fp32 (YAML 1.1 reads `off` as false, "
                             "YAML 1.2 as \"off\"): write `amp: none` (none | bf16 | fp16)")
        return v

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
        if self.train_scale_range is not None:
            lo_hi = self.train_scale_range
            if len(lo_hi) != 2 or not self.train_crop_size <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"train_scale_range {lo_hi}: two shorter sides [lo, hi] with train_crop_size "
                                 f"({self.train_crop_size}) <= lo <= hi")
        if self.val_crop_size > self.val_resize_size:
            raise ValueError("val_crop_size must be <= val_resize_size")
        if self.lr_warmup_epochs >= self.epochs and self.epochs > 1:
            raise ValueError("lr_warmup_epochs must be smaller than epochs")
        return self

    @model_validator(mode="after")
    def _worker_decode_applies_the_recipe(self) -> TrainParams:
        # The decode-on-worker path has no post-crop augmentations yet: refuse them rather than drop them.
        if self.decode == "worker":
            on = worker_decode_blockers(self)
            if on:
                raise ValueError(f"train.decode: worker does not apply {', '.join(on)} yet: "
                                 "set train.decode: tasks (or auto), or turn them off")
        return self


def worker_decode_blockers(tp: TrainParams) -> list[str]:
    """The train keys switched on that the decode-on-worker path does not apply yet (train.decode: worker refuses
    them; auto then keeps decoding in tasks)."""
    return ["train." + key for key, value in (
        ("auto_augment", tp.auto_augment), ("random_erase", tp.random_erase), ("pca_lighting", tp.pca_lighting),
        ("train_scale_range", tp.train_scale_range), ("ra_sampler", tp.ra_sampler),
        ("prog_resize_min_size", tp.prog_resize_min_size), ("deterministic", tp.deterministic),
    ) if value not in (None, False, 0, 0.0)]


# train.decode: auto. What one CPU core decodes for the `tasks` path, from docs/performance.md (224 px
# RandomResizedCrop from ~500x375 ImageNet-like JPEGs, libjpeg-turbo 2.1.5): the `jpeg_decode_stages` table's
# "ours, `train_image` end to end" (ROI decode + resize + flip, 2.229 ms of a core an image) plus the Ray Data
# plumbing around it measured by `ingest_plumbing_vs_imagefolder_plumbing` (0.89 ms of CPU an image): ~3.12 ms, i.e.
# ~320 images/s per core (the end-to-end `ingest_vs_imagefolder` record, 500-512 img/s on 2 CPUs, agrees).
CPU_DECODE_MS_PER_IMAGE = 2.229 + 0.89
# What one GPU consumes: a ResNet-50 bf16 training step on an H100, ~3,000 img/s (docs/performance.md's "What
# runs where"; an estimate, not measured on this project: no GPU has been lent to it). Deeper nets eat fewer.
GPU_IMAGES_PER_S = 3000.0
# Below this many CPUs left for decoding per GPU worker, the CPU path cannot feed the GPU: 3,000 img/s x 3.12 ms =
# 9.4 busy cores, rounded up.
DECODE_CPUS_PER_GPU = math.ceil(GPU_IMAGES_PER_S * CPU_DECODE_MS_PER_IMAGE / 1000)


def choose_decode(decode: str, *, use_gpu: bool, decode_cpus_per_gpu: float,
                  blockers: Sequence[str] = ()) -> tuple[str, str]:
    """(`tasks` | `worker`, why): train.decode resolved for a run. `auto` picks `worker` (nvJPEG on each GPU
    worker) when the CPUs left for Ray Data's decode tasks per GPU worker are below DECODE_CPUS_PER_GPU, else
    `tasks`; always `tasks` on CPU-only workers (there the worker's CPUs are the training's) and when a recipe key
    the worker path does not apply is on. `tasks` and `worker` are kept as they are."""
    if decode != "auto":
        return decode, "set in train.decode"
    rate = 1000 / CPU_DECODE_MS_PER_IMAGE
    if not use_gpu:
        return "tasks", "CPU-only workers: decoding in Ray Data tasks"
    if blockers:
        return "tasks", f"the worker path does not apply {', '.join(blockers)} yet"
    have = f"{decode_cpus_per_gpu:g} CPUs per GPU left for decoding (~{decode_cpus_per_gpu * rate:,.0f} img/s)"
    if decode_cpus_per_gpu < DECODE_CPUS_PER_GPU:
        return "worker", (f"{have} < {DECODE_CPUS_PER_GPU} needed to feed ~{GPU_IMAGES_PER_S:,.0f} img/s at "
                          f"{CPU_DECODE_MS_PER_IMAGE:.2f} ms of a core an image: nvJPEG on the GPU workers")
    return "tasks", f"{have} >= {DECODE_CPUS_PER_GPU} needed: CPU decoding in Ray Data tasks"


class EvalParams(_Section):
    batch_size: int = Field(
        128, ge=1, le=1 << 20, description="Images per inference batch (a runtime knob: reruns nothing)."
    )
    ten_crop: bool = Field(False, description="The paper's 10-crop test (sec. 3.4) instead of 1 center crop.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="The evaluate stage's precision, for every row of the table alike: ours and the "
        "torchvision reference row (their published numbers are fp32). The rows are comparable only at one "
        "precision: bf16 logits flip ~1% of top-1 predictions against fp32. bf16/fp16 = autocast (faster on "
        "GPUs). Validation during training keeps train.amp."
    )
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
    archs: list[str] = Field(
        default_factory=lambda: ["resnet18", "resnet50"], min_length=1,
        description="Architectures searched, one ASHA search each; every arch of model.archs takes the lr of "
        "its own entry or of the listed arch of its kind (family and block: basic vs bottleneck) nearest in depth.",
    )
    num_samples: int = Field(3, ge=1, le=10_000, description="Trials per tuned arch (random search under ASHA).")
    epochs: int = Field(
        2, ge=1, le=1000, description="Epochs of one trial (ASHA's max_t): a complete shortened schedule, the "
        "final run's warmup and decay compressed onto these epochs (docs/tuning.md).",
    )
    lr_per_256_low: float = Field(
        0.2, gt=0, description="Lower end of the log-uniform search, in lr per 256 images: a trial's "
        "rate is this x its global batch / 256 (the published ResNet recipes sit near 0.1).",
    )
    lr_per_256_high: float = Field(0.8, gt=0, description="Upper end of the search, in lr per 256 images.")
    lr_warmup_epochs: list[int] | None = Field(
        default_factory=lambda: [0, 1],
        description="Warmup choices in trial epochs (each < tune.epochs); the final run takes the same share of "
        "its own epochs. null = not searched: trials warm up for the final run's warmup compressed onto "
        "tune.epochs, and the final run keeps train.lr_warmup_epochs.",
    )
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: 1/this of the trials continue at each rung.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; null = as many as the cluster fits (or num_samples on a growable one)."
    )
    workers_per_trial: int = Field(
        0, ge=0, le=4096,
        description="Ray Train workers per trial; 0 = the trial trains in its own process (cheap start-up on "
        "small machines), >= 1 = a worker group reporting through TuneReportCallback.",
    )
    train_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of the train shards a trial reads (shards hold mixed classes)."
    )
    time_budget_s: float = Field(
        120, gt=0, description="Per tuned arch: its search stops starting/continuing trials after this."
    )

    @field_validator("archs")
    @classmethod
    def _known_archs(cls, archs: list[str]) -> list[str]:
        return _check_archs(archs)

    @model_validator(mode="after")
    def _bounds(self) -> TuneParams:
        if self.lr_per_256_low >= self.lr_per_256_high:
            raise ValueError("tune.lr_per_256_low must be < tune.lr_per_256_high")
        if self.lr_warmup_epochs is not None and (
                not self.lr_warmup_epochs or any(w < 0 or w >= self.epochs for w in self.lr_warmup_epochs)):
            raise ValueError("tune.lr_warmup_epochs: null or a non-empty list of choices in [0, tune.epochs)")
        return self


class DegradationParams(_Section):
    """The degradation experiment (He et al. 2015, section 4.1 Fig. 4; section 4.2 Fig. 6): plain and residual
    networks of two depths trained in-process with one recipe. Settings not listed here come from `train`."""

    # The ImageNet presets (configs/) extend params.yaml and switch it off: it would train four extra networks
    # on ImageNet-size shards.
    enabled: bool = Field(True, description="false: the stage only writes a summary saying it was switched off.")
    archs: list[str] = Field(
        default_factory=lambda: ["plain20", "plain56", "resnet20", "resnet56"],
        min_length=2,
        description="Models compared, plain (name containing 'plain') and residual; all get the same recipe.",
    )
    epochs: int = Field(3, ge=1, le=1000, description="Epochs per model.")
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
    alias: str = Field(
        "champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        description="Alias moved to a version only when it beats the current one on minival (never val), same data.",
    )


class TrackingParams(_Section):
    experiment: str = Field("resnet-pipeline", min_length=1, description="MLflow experiment of every run.")


class ClusterParams(_Section):
    """How stages get their resources; never changes a result (no DVC stage depends on it)."""

    wait_for_resources_s: float = Field(
        900, ge=0, le=86_400, description="On a cluster that can grow (RAY_ADDRESS set): how long a stage waits "
        "for the autoscaler to bring up what it asked for before it stops naming what is missing."
    )


class Params(_Section):
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order, augmentation and tuning.")
    data: DataParams = Field(default_factory=DataParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    degradation: DegradationParams = Field(default_factory=DegradationParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    cluster: ClusterParams = Field(default_factory=ClusterParams)

    @model_validator(mode="after")
    def _every_arch_has_a_tuned_kind(self) -> Params:
        # With use_tuned, each trained arch takes the lr tuned for its kind of network (pipeline.archs'
        # transfer rule); an arch of a kind that tune never searches would silently get another kind's rate.
        if self.train.use_tuned:
            lost = [a for a in self.model.archs if lr_source_arch(a, self.tune.archs) is None]
            if lost:
                kinds = sorted({"/".join(network_kind(a)) for a in lost})
                raise ValueError(
                    f"tune.archs {self.tune.archs} has no arch of the kind of {lost} ({', '.join(kinds)}): add one "
                    "to tune.archs, or set train.use_tuned: false to train them with train.lr"
                )
        return self

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
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:  # e.g. train.lr=[0.1: one line naming the key, not PyYAML's traceback
        why = getattr(exc, "problem", None) or type(exc).__name__
        raise ParamsError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({why}); quote it or fix "
                          "the brackets") from None


# A preset (configs/*.yaml) holds only what differs from the file it names in `extends` (params.yaml: the one
# home of every default); `resolve_tree` merges the two, `write_preset` writes the merged file DVC reads.
EXTENDS = "extends"
GENERATED = "# Generated by `python -m pipeline.config preset"


def _read_tree(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return tree


def merge_tree(base: dict[str, Any], over: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """`base` with the keys of `over`: a section of the schema (a sub-model, e.g. `train`, `data.synthetic`) is
    merged key by key, every other value (numbers, lists, mappings such as `train.epochs_by_arch`) replaced."""
    model = Params if model is None else model
    out = dict(base)
    for key, value in over.items():
        field = model.model_fields.get(key)
        sub = field.annotation if field is not None else None
        if (isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict)
                and isinstance(out.get(key), dict)):
            out[key] = merge_tree(out[key], value, sub)
        else:
            out[key] = value
    return out


def resolve_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The parameter tree of `path`: its own keys over those of the file its `extends` names (a path relative to
    `path`'s folder, e.g. `../params.yaml`), recursively. A file without `extends` is read as it is."""
    path = Path(path)
    tree = _read_tree(path)
    if EXTENDS not in tree:
        return tree
    base_name = tree.pop(EXTENDS)
    if not isinstance(base_name, str) or not base_name:
        raise ParamsError(f"{path}: {EXTENDS}: a params file path, e.g. ../params.yaml")
    base = (path.parent / base_name).resolve()
    if base in _seen or base == path.resolve():
        raise ParamsError(f"{path}: {EXTENDS}: {base_name} extends itself")
    if base.is_file() and base.read_text().startswith(GENERATED):
        raise ParamsError(
            f"{path}: {EXTENDS}: {base} was generated from a preset, not the default the preset lists its "
            f"differences from: restore it (git checkout {base.name}) before applying another preset")
    return merge_tree(resolve_tree(base, (*_seen, path.resolve())), tree)


def write_preset(preset: str | Path, out: str | Path) -> Params:
    """Write `preset` resolved over its base as one whole params file `out` (what `dvc repro` reads), validated
    first; returns the parameters. `out` may be the base itself (params.yaml): it is read before it is written."""
    preset = Path(preset)
    tree = resolve_tree(preset)
    params = _validate(tree, str(preset))
    header = (f"{GENERATED} {preset.as_posix()} {Path(out).as_posix()}`:\n# the preset's keys over the default "
              "params.yaml. Edit the preset, not this file; `git checkout params.yaml` restores the default.\n")
    Path(out).write_text(header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, width=120))
    return params


def preset_diff(preset: str | Path) -> dict[str, Any]:
    """The dotted keys a preset sets, each with (the base's resolved value, the preset's value)."""
    preset = Path(preset)
    own = _read_tree(preset)
    base_name = own.pop(EXTENDS, None)
    if base_name is None:
        raise ParamsError(f"{preset}: no `{EXTENDS}:` (a preset lists its differences from params.yaml)")
    base = Params.model_validate(resolve_tree(preset.parent / base_name)).model_dump(mode="json")
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], ref: Any, prefix: str, model: type[BaseModel]) -> None:
        for key, value in node.items():
            field = model.model_fields.get(key)
            sub = field.annotation if field is not None else None
            ref_value = ref.get(key) if isinstance(ref, dict) else None
            if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
                walk(value, ref_value, prefix + key + ".", sub)
            else:
                out[prefix + key] = (ref_value, value)

    walk(own, base, "", Params)
    return out


def _validate(tree: dict[str, Any], source: str) -> Params:
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "value_error":  # our validators' own messages: without pydantic's "Value error, "
                msg = str(err.get("ctx", {}).get("error", msg))
            problems.append(msg if msg.startswith(f"{key}: ") else f"{key}: {msg}")
        raise ParamsError(f"{source}: " + "; ".join(problems)) from None


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] | Sequence[str] = ()) -> Params:
    """Read `path` (a preset resolved over the file it extends), apply `--set`-style overrides, validate. Raises
    ParamsError naming the file and key."""
    path = Path(path)
    tree = resolve_tree(path)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value, str(path))
    return _validate(tree, str(path))


def with_absolute_paths(p: Params, root: str | Path = ".") -> Params:
    """Resolve relative data/checkpoint paths against `root`: Ray workers and Tune trials run in other
    working directories. URIs (s3://, gs://, file://) are left as they are."""

    def fix(path: str) -> str:
        return path if "://" in path else str((Path(root) / path).resolve())

    data = p.data.model_copy(update={"raw_dir": fix(p.data.raw_dir), "shards_dir": fix(p.data.shards_dir)})
    train = p.train.model_copy(update={"storage_path": fix(p.train.storage_path)})
    return p.model_copy(update={"data": data, "train": train})


# --- docs/parameters.md is generated from the field descriptions above (`make docs`; a test keeps it in sync) ---

_SECTION_DOCS = {
    "data": "Raw data, shards and preparation (docs/data.md).",
    "model": "Which networks the DAG trains, and their construction options.",
    "train": "The training recipe and its runtime knobs (docs/training.md).",
    "eval": "The evaluate stage (docs/evaluation.md).",
    "tune": "The Ray Tune search over learning rate and warmup (docs/training.md).",
    "degradation": "The plain-vs-residual experiment (docs/degradation.md).",
    "registry": "MLflow model registry names and the champion alias (docs/evaluation.md).",
    "tracking": "MLflow tracking.",
    "cluster": "How stages wait for an autoscaling cluster (docs/cluster.md).",
}


def _bounds(field: Any) -> str:
    """A field's constraints as text: `>= 1, <= 100`, the choices of a Literal, a pattern."""
    import types
    import typing

    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
                           ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} `{value}`")
    choices: list[str] = []
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    for arg in typing.get_args(field.annotation) if union else (field.annotation,):
        if typing.get_origin(arg) is Literal:
            choices += [json.dumps(a) for a in typing.get_args(arg)]
        elif arg is type(None):
            choices.append("null")
    if choices and any(c != "null" for c in choices):
        parts.insert(0, "one of " + ", ".join(f"`{c}`" for c in choices))
    elif choices:
        parts.append("or `null`")
    return "; ".join(parts)


def parameters_markdown() -> str:
    """The reference of every parameter: key, default, allowed values, meaning (docs/parameters.md)."""
    lines = [
        "# Parameters",
        "",
        "Every key of `params.yaml`, generated from the schema in `pipeline/config.py` (`make docs`; a test fails",
        "when this page and the schema differ). Unknown keys and out-of-bounds values are refused with the key and",
        "the file named. Override any key with `--set key.sub=value` on a stage, or `dvc exp run -S key=value`.",
        "",
    ]

    def rows(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            key = prefix + name
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                out += rows(field.annotation, key + ".")
                continue
            default = field.get_default(call_default_factory=True)
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | `{json.dumps(default)}` | {_bounds(field)} | {desc} |")
        return out

    header = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    top = [f for f, info in Params.model_fields.items()
           if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel))]
    lines += ["## Top level", "", *header]
    for name in top:
        field = Params.model_fields[name]
        lines.append(f"| `{name}` | `{json.dumps(field.get_default(call_default_factory=True))}` | {_bounds(field)} | "
                     f"{field.description or ''} |")
    for name, info in Params.model_fields.items():
        if name in top:
            continue
        lines += ["", f"## `{name}`", "", _SECTION_DOCS.get(name, ""), "", *header, *rows(info.annotation, name + ".")]
    return "\n".join(lines) + "\n"


def undocumented_fields() -> list[str]:
    """Keys whose schema field has no description (the generated reference would leave them unexplained)."""
    missing: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, prefix + name + ".")
            elif not field.description:
                missing.append(prefix + name)

    walk(Params, "")
    return missing


if __name__ == "__main__":
    # `python -m pipeline.config docs/parameters.md` (what `make docs` runs), or
    # `python -m pipeline.config preset configs/paper.yaml params.yaml` (a preset as the params file DVC reads).
    import sys

    if sys.argv[1:2] == ["preset"]:
        if len(sys.argv) != 4:
            sys.exit("usage: python -m pipeline.config preset configs/PRESET.yaml params.yaml")
        try:
            write_preset(sys.argv[2], sys.argv[3])
        except ParamsError as exc:
            sys.exit(str(exc))
        print(f"{sys.argv[3]}: {sys.argv[2]} over the default")
    else:
        Path(sys.argv[1]).write_text(parameters_markdown())
