"""The per-worker training function: a thin Ray shell around a plain PyTorch loop.

Ray provides the data shard, the process group and checkpoint persistence; everything else is ordinary
PyTorch so the same function runs in-process (`num_workers=0`, tests) and on a GPU cluster.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from pipeline import progress, tracking
from pipeline.config import Params
from pipeline.data.augment import progressive_sizes, resize_batch, size_for_epoch
from pipeline.data.transforms import normalize
from pipeline.data.worker_decode import worker_batches
from pipeline.metrics import amp_dtype_of, eval_logits, topk_counts
from pipeline.models import build_model, model_info
from pipeline.models.pretrained import init_from_pretrained, load_state_dict
from pipeline.training import dist, probe
from pipeline.training.checkpoint import load_train_state, save_train_state
from pipeline.training.ema import EMA, update_decay
from pipeline.training.errors import TrainingDiverged
from pipeline.training.local import InMemoryValShard
from pipeline.training.optim import build_optimizer, load_optimizer_state, mix_batch
from pipeline.training.schedule import lr_at

# Ray stays a function-level import (TrainSession, TuneTrialSession): an in-process run never loads it.


class NextEpoch:
    """An epoch's batches, started in a background thread.

    Ray Data begins a new streaming execution every epoch, ~0.3-0.6 s to the first batch on a 2-core machine
    (measured: `data_first_batch_s`). Started as soon as the previous epoch's last step is done, that start-up
    runs during the previous epoch's validation and checkpoint instead of stalling the next epoch's first step.
    Iterating waits for the first batch (or re-raises the thread's error), then continues in the caller."""

    _END = object()

    def __init__(self, make_batches: Callable[[], Iterable[Any]]) -> None:
        self._batches: Iterator[Any] | None = None
        self._first: Any = self._END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(make_batches,), name="next-epoch-data", daemon=True)
        self._thread.start()

    def _start(self, make_batches: Callable[[], Iterable[Any]]) -> None:
        try:
            self._batches = iter(make_batches())
            self._first = next(self._batches, self._END)
        except BaseException as e:  # noqa: BLE001 (re-raised in the training thread)
            self._error = e

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is self._END or self._batches is None:
            return
        yield self._first
        yield from self._batches


# fp16 + GradScaler legitimately produces a few inf losses while the scale calibrates; anything else
# non-finite, or more than this many in a row, is divergence.
MAX_CONSECUTIVE_NONFINITE = 5
# The divergence watch reads its device-side counters every this many steps, from a copy started at the
# previous look: a non-finite loss is caught at most ~2x this many steps late, and the step never waits.
DIVERGENCE_CHECK_EVERY = 8

# train.log_grad_stats' measurement of one batch: (the bare model, after backward; the batch's normalised images)
# -> MLflow metrics. The caller supplies it (pipeline.analysis.measure.gradient_stats): the statistics are
# analysis code, a floor above training, which never imports it.
GradStats = Callable[[nn.Module, torch.Tensor], dict[str, float]]


@dataclass
class Job:
    """What one training run needs besides params (filled in by the driver, sent to every worker)."""

    params: dict[str, Any]
    arch: str
    lr: float
    lr_warmup_epochs: int
    epochs: int
    num_classes: int
    classes: list[str]
    n_train: int
    val_files: list[str]
    train_files: list[str] = field(default_factory=list)
    n_val: int = 0  # val images in the manifest: validation must count exactly this many (0 = not checked)
    class_names: dict[str, str] = field(default_factory=dict)
    data_fingerprint: str = ""
    git_commit: str = "unknown"
    mlflow_run_id: str | None = None
    threads: int = 1
    pretrained_path: str | None = None  # torchvision weights to start from (train.pretrained)
    # In-process runs (no Ray Train to persist checkpoints): the checkpoint is rewritten in this directory each
    # epoch. None: each epoch's checkpoint goes to a temporary directory that the session persists (Ray Train).
    checkpoint_dir: str | None = None
    grad_stats: GradStats | None = None  # required when train.log_grad_stats (see GradStats)
    # train.decode as resolved for this cluster ("tasks" | "worker"; trainer.resolve_decode turns `auto` into
    # one); "" = train.decode as written.
    decode: str = ""

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


class Session(Protocol):
    """Where a run's data comes from and its reports go: a Ray Train worker (`TrainSession`), a Tune trial
    (`TuneTrialSession`) or a plain process (`pipeline.training.local.InProcessSession`)."""

    device: torch.device

    def checkpoint(self) -> Any: ...  # an object with `as_directory()`, or None

    def train_shard(self) -> Any: ...  # has iter_torch_batches(...)

    def val_shard(self) -> Any: ...  # has iter_torch_batches(...), or None: validate on job.val_files in-process

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


def model_kwargs(p: Params, arch: str) -> dict[str, Any]:
    """The model.* params this builder accepts: plain nets take no shortcut/zero-init, CIFAR nets keep the
    paper's option A unless model.shortcut is set explicitly."""
    wanted = {
        "shortcut": p.model.shortcut,
        "zero_init_residual": p.model.zero_init_residual,
        "dropout": p.model.dropout,
        "checkpoint_activations": p.model.checkpoint_activations,
    }
    accepted = model_info(arch)["defaults"]
    return {k: v for k, v in wanted.items() if k in accepted and v is not None}


def _build_model(job: Job, p: Params) -> nn.Module:
    model = build_model(job.arch, num_classes=job.num_classes, **model_kwargs(p, job.arch))
    if job.pretrained_path:  # fine-tuning: torchvision's backbone, a fresh head for other classes
        init_from_pretrained(model, load_state_dict(job.pretrained_path))
    return model


def _amp(p: Params) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    return amp_dtype_of(p.train.amp), p.train.amp == "fp16"


class TrainSession:
    """Ray Train's per-worker API (a TorchTrainer worker, or its in-process local mode)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self.device = ray.train.torch.get_device()

    def checkpoint(self) -> Any:
        return self._train.get_checkpoint()

    def train_shard(self) -> Any:
        return self._train.get_dataset_shard("train")

    def val_shard(self) -> Any:
        try:
            return self._train.get_dataset_shard("val")
        except KeyError:  # a trainer built without a val dataset: run_loop decodes job.val_files itself
            return None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            self._train.report(metrics, checkpoint=None)
            return
        from ray.train import CheckpointUploadMode

        # Uploaded in the background (an ImageNet ResNet-50 checkpoint is ~200 MB to object storage): the next
        # epoch starts at once; Ray deletes the local directory once it is persisted, and waits for the last
        # upload before the run ends.
        self._train.report(metrics, checkpoint=self._train.Checkpoint.from_directory(checkpoint_dir),
                           checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    # The loop hands this session a directory it may keep (report() above removes it after the upload).
    keeps_checkpoint_dir = True


class TuneTrialSession:
    """A Tune trial that trains in its own process (tune.workers_per_trial: 0): Tune's API instead of
    Train's, since Ray refuses ray.train.* inside a Tune function (ray-project/ray#49454)."""

    def __init__(self, dataset: Any, val_dataset: Any = None) -> None:
        self._dataset = dataset
        self._val = val_dataset
        # The trial asks Tune for a GPU when train.use_gpu; Ray then exposes exactly that one.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def train_shard(self) -> Any:
        return self._dataset

    def val_shard(self) -> Any:
        return self._val

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)  # ASHA reads this and may stop the trial here


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The TorchTrainer worker function."""
    probe.start_from_env()
    run_loop(Job(**config), TrainSession())


# --- the loop: set up, restore, then per epoch: train, validate, checkpoint --------------------------------


class DivergenceWatch:
    """Non-finite losses, counted on the device and looked at without stalling the step.

    Each step adds to device tensors (the current run of consecutive non-finite losses, the longest run, the
    first bad step); every DIVERGENCE_CHECK_EVERY steps the counters are copied to pinned host memory with
    `non_blocking=True` and an event, and the copy made at the previous look is read if its event has completed.
    So the GPU queue never drains for it. Every rank also sends its longest run in the epoch-end all-reduce, so
    all ranks raise together at the latest there."""

    def __init__(self, device: torch.device, allowed: int) -> None:
        self.device = device
        self.allowed = allowed
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.worst = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._host = torch.zeros(2, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._event: Any = None
        self._pending = False

    def new_epoch(self) -> None:
        self.worst.zero_()
        self.first_bad.fill_(-1)  # `run` carries over: consecutive means across the epoch boundary too

    def update(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """Count this step's loss; returns the device flag `finite` (for masking the loss sum)."""
        finite = torch.isfinite(loss.detach())
        self.run = torch.where(finite, torch.zeros_like(self.run), self.run + 1)
        self.worst = torch.maximum(self.worst, self.run)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, torch.full_like(self.first_bad, step),
                                     self.first_bad)
        return finite

    def poll(self, epoch: int, step: int, where: str) -> None:
        """Every DIVERGENCE_CHECK_EVERY steps: read the previous copy if it is done, start a new one. On a CPU
        device the copy is synchronous anyway, so it is read at once."""
        if step % DIVERGENCE_CHECK_EVERY:
            return
        probe.phase("divergence_watch")
        if self._pending and (self._event is None or self._event.query()):
            self._read(epoch, where)
        self._host.copy_(torch.stack([self.worst, self.first_bad]), non_blocking=True)
        self._pending = True
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._read(epoch, where)

    def _read(self, epoch: int, where: str) -> None:
        worst, first = self._host.tolist()
        self._pending = False
        self.raise_if_diverged(worst, first, epoch, where)

    def raise_if_diverged(self, worst: float, first_bad: float, epoch: int, where: str) -> None:
        """TrainingDiverged, which Ray Train does not retry: the checkpoint restores the same weights and RNG
        streams, so a retry would diverge again (pipeline.training.errors)."""
        if worst > self.allowed:
            raise TrainingDiverged(
                f"non-finite training loss at epoch {epoch} step {int(first_bad)} ({where}; {int(worst)} in a row): "
                "lower train.lr, raise lr_warmup_epochs or set train.clip_grad_norm"
            )


@dataclass
class _Run:
    """Everything one worker's loop holds between steps (built by `_setup`, updated by `_restore`)."""

    job: Job
    p: Params
    session: Any
    device: torch.device
    rank: int
    world_size: int
    model: nn.Module  # what the step calls (DDP-wrapped and/or compiled)
    core: nn.Module  # the bare model (state dicts, evaluation)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    amp_dtype: torch.dtype | None
    criterion: nn.Module
    mix_rng: np.random.Generator
    watch: DivergenceWatch
    per_worker_batch: int
    steps_per_epoch: int
    crop_sizes: list[int] | None = None  # progressive resizing: the train crop of each epoch
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)


def run_loop(job: Job, session: Session) -> None:
    """The training loop proper; `session` is where data comes from and reports go."""
    # train.deterministic switches process-wide torch flags: an in-process run (num_workers=0, tests, Tune trials)
    # gives the caller its own back.
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    try:
        _run_loop(job, session)
    finally:
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[1], flags[2]


def _run_loop(job: Job, session: Session) -> None:
    run = _setup(job, session)
    _restore(run)
    tp = run.p.train
    val_source = run.session.val_shard()
    if val_source is None:  # a plain process: the val files decoded here, with the stage's decode
        val_source = InMemoryValShard(dist.shard_for_rank(job.val_files, run.rank, run.world_size),
                                      resize=tp.val_resize_size, crop=tp.val_crop_size)
    train_shard = run.session.train_shard()
    next_batches = _epoch_batches(run, train_shard, run.start_epoch) if run.start_epoch < job.epochs else None
    last_val: tuple[float, float, int] = (math.nan, math.nan, 0)
    t_start = time.perf_counter()  # the ETA: this process's pace over the epochs it ran (a resumed run's too)
    for epoch in range(run.start_epoch, job.epochs):
        assert next_batches is not None
        t0 = time.perf_counter()
        validate_now = (epoch + 1) % tp.val_every_epochs == 0 or epoch + 1 == job.epochs
        # The val pipeline starts with the epoch: its decode tasks run beside training (bounded by Ray Data's
        # backpressure), so validation finds its first batches ready instead of waiting for a cold start.
        val_batches = _val_batches(run, val_source) if validate_now else None
        sums, grad_stats, timing = _train_epoch(run, epoch, next_batches)
        # The next epoch's data starts now, behind this epoch's validation and checkpoint.
        next_batches = _epoch_batches(run, train_shard, epoch + 1) if epoch + 1 < job.epochs else None
        t_val = time.perf_counter()
        val_counts = _validate(run, val_batches) if val_batches is not None else None
        timing["val"] = time.perf_counter() - t_val
        metrics = _epoch_metrics(run, epoch, sums, val_counts, timing, t0, last_val)
        if validate_now:
            last_val = (metrics["val_top1_err"], metrics["val_top5_err"], metrics["val_images"])
        run.history.append(metrics)
        if run.rank == 0:  # before the report: a Tune trial that ASHA stops there still prints its last epoch
            _print_epoch(run, epoch, metrics, validate_now, time.perf_counter() - t_start)
        # Gradient statistics travel with the epoch's metrics to MLflow and Ray, but stay out of `history`: the
        # per-epoch curve keeps its columns (and epochs without a measurement would lack them).
        _checkpoint_and_report(run, epoch + 1, {**metrics, **grad_stats})
    probe.finish(run.rank)


def check_grad_stats(p: Params, grad_stats: GradStats | None) -> None:
    """train.log_grad_stats needs the caller's measurement (GradStats): refuse a run that would silently log
    none."""
    if p.train.log_grad_stats and grad_stats is None:
        raise ValueError("train.log_grad_stats is true but this run was given no gradient statistics to call "
                         "(Job.grad_stats: pass grad_stats=pipeline.analysis.measure.gradient_stats)")


def _print_epoch(run: _Run, epoch: int, metrics: dict[str, Any], validated: bool, elapsed_s: float) -> None:
    """The epoch's console line (rank 0), from the metrics the epoch-end all-reduce already brought to the host:
    no extra synchronisation."""
    job = run.job
    eta = progress.eta_s(epoch + 1 - run.start_epoch, job.epochs - run.start_epoch, elapsed_s)
    progress.print_line(progress.epoch_line(
        job.arch, epoch + 1, job.epochs, loss=metrics["train_loss"], images_per_s=metrics["images_per_s"],
        epoch_s=metrics["epoch_time_s"], eta=eta, val_top1_err=metrics["val_top1_err"] if validated else None))


def _setup(job: Job, session: Session) -> _Run:
    p = Params.model_validate(job.params)
    tp = p.train
    check_grad_stats(p, job.grad_stats)
    torch.set_num_threads(job.threads)
    rank, world_size = dist.world()
    torch.manual_seed(p.seed + rank)
    device = session.device
    if tp.deterministic:
        set_deterministic(device)
    elif device.type == "cuda":
        # Fixed input sizes: let cuDNN pick the fastest convolution algorithms once (torchvision's recipe does).
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if tp.channels_last else torch.contiguous_format
    model = _build_model(job, p).to(device=device, memory_format=memory_format)
    if tp.sync_bn and world_size > 1:
        if device.type == "cpu":  # torch's SyncBatchNorm raises on CPU tensors: say so once, train with plain BN
            if rank == 0:
                print(f"[train {job.arch}] train.sync_bn ignored: SyncBatchNorm needs GPUs (per-worker BN on CPU)",
                      flush=True)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world_size > 1:
        model = session.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    ema = (EMA(core, update_decay(tp.model_ema_decay, tp.batch_size, tp.model_ema_steps, job.epochs),
               every=tp.model_ema_steps, warmup_epochs=job.lr_warmup_epochs) if tp.model_ema_decay > 0 else None)
    amp_dtype, use_scaler = _amp(p)
    per_worker_batch = tp.batch_size // max(world_size, 1)
    return _Run(
        job=job, p=p, session=session, device=device, rank=rank, world_size=world_size,
        model=torch.compile(model) if tp.compile else model, core=core,
        optimizer=build_optimizer(core, tp, job.lr), scaler=torch.amp.GradScaler(device.type, enabled=use_scaler),
        ema=ema, amp_dtype=amp_dtype, criterion=nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing),
        mix_rng=np.random.default_rng([p.seed, 7, rank]),
        watch=DivergenceWatch(device, MAX_CONSECUTIVE_NONFINITE if use_scaler else 0),
        per_worker_batch=per_worker_batch,
        # streaming_split(equal=True) gives every rank floor(n / world) rows; drop_last keeps steps equal.
        steps_per_epoch=max(job.n_train // max(world_size, 1) // per_worker_batch, 1),
        crop_sizes=None if tp.prog_resize_min_size is None else progressive_sizes(
            job.epochs, tp.train_crop_size, tp.prog_resize_min_size, tp.prog_resize_ramp_start,
            tp.prog_resize_ramp_end, tp.prog_resize_step),
    )


def set_deterministic(device: torch.device) -> None:
    """train.deterministic: torch's deterministic kernels (an op without one raises, naming itself, rather than
    silently varying), cuDNN's autotuner off (it may pick another algorithm per run) and cuBLAS's fixed-size
    workspace (its default one makes GEMM reductions order-dependent; the variable must be set before the first
    cuBLAS call, i.e. here, before the model is built on the device)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def _restore(run: _Run) -> None:
    """Resume from the session's checkpoint: weights, optimizer, scaler, EMA, and this rank's RNG streams (CPU,
    CUDA, mixup), so a `train.max_failures` retry continues the same run rather than a perturbed one."""
    checkpoint = run.session.checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as ckpt_dir:
        state = load_train_state(ckpt_dir)
    run.core.load_state_dict(state["model"])
    load_optimizer_state(run.optimizer, state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        if state.get("ema"):
            run.ema.load_state_dict(state["ema"])
        elif run.rank == 0:
            print(f"[train {run.job.arch}] the checkpoint has no EMA weights: EMA restarts from the current weights",
                  flush=True)
    _set_rng_state(run, state.get("rng"))
    run.start_epoch, run.history = int(state["epoch"]), list(state["history"])
    run.resumed_at = [*state.get("resumed_at", []), run.start_epoch]
    if run.rank == 0:
        print(f"[train {run.job.arch}] resumed from checkpoint: epoch {run.start_epoch} of {run.job.epochs} done",
              flush=True)


def _rng_state(run: _Run) -> dict[str, Any]:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
        "mix": run.mix_rng.bit_generator.state,
    }


def _set_rng_state(run: _Run, saved: Any) -> None:
    """`saved` is the list of every rank's streams (rank r takes entry r); older checkpoints held rank 0's CPU
    generator only, and a different world size cannot map ranks one to one: then streams stay freshly seeded."""
    if isinstance(saved, list) and len(saved) == run.world_size:
        mine = saved[run.rank]
        torch.set_rng_state(mine["cpu"])
        if mine.get("cuda") is not None and run.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], run.device)
        run.mix_rng.bit_generator.state = mine["mix"]
    elif saved is not None and run.rank == 0:
        print(f"[train {run.job.arch}] the checkpoint's RNG state is for another worker count: reseeded", flush=True)


def _epoch_batches(run: _Run, train_shard: Any, epoch: int) -> NextEpoch:
    if (run.job.decode or run.p.train.decode) == "worker":
        return _worker_decoded_batches(run, train_shard, epoch)
    return NextEpoch(lambda: train_shard.iter_torch_batches(
        batch_size=run.per_worker_batch, drop_last=True, dtypes={"image": torch.uint8, "label": torch.int64},
        local_shuffle_buffer_size=4 * run.per_worker_batch, local_shuffle_seed=run.p.seed + 1000 * epoch + run.rank,
        # Pinned host memory: the host-to-GPU copy is asynchronous and overlaps the previous step.
        device=run.device, pin_memory=run.device.type == "cuda", prefetch_batches=2,
    ))


def _worker_decoded_batches(run: _Run, train_shard: Any, epoch: int) -> NextEpoch:
    """train.decode "worker": the shard holds JPEG bytes + drawn crops; this worker decodes them on its device
    (pipeline.data.worker_decode), each batch while the previous step runs. Same batching and shuffle as above."""
    return NextEpoch(lambda: worker_batches(
        train_shard, batch_size=run.per_worker_batch, device=run.device, crop=run.p.train.train_crop_size,
        threads=run.job.threads, local_shuffle_buffer_size=4 * run.per_worker_batch,
        local_shuffle_seed=run.p.seed + 1000 * epoch + run.rank, prefetch_batches=2,
    ))


def _train_epoch(run: _Run, epoch: int, batches: NextEpoch) -> tuple[dict[str, Any], dict[str, float], dict]:
    """One epoch of train steps. Loss, accuracy and non-finite counts accumulate on the device: the step issues
    no host synchronisation and no collective besides DDP's gradient all-reduce."""
    job, tp, device = run.job, run.p.train, run.device
    run.model.train()
    run.watch.new_epoch()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, step = 0, 0
    # Off (the default): no extra work and no host sync. On: one batch per measured epoch, every rank alike
    # (no rank waits in a collective the others skip, SyncBN included); rank 0 reports.
    grad_stats: dict[str, float] = {}
    measure_epoch = (job.grad_stats is not None and tp.log_grad_stats
                     and (epoch + 1) % tp.grad_stats_every_epochs == 0)
    data_wait = first_wait = 0.0  # seconds blocked on the input pipeline: > a few % of the epoch = input-bound
    lr = job.lr
    t0 = t_fetch = time.perf_counter()
    for batch in batches:
        waited = time.perf_counter() - t_fetch
        data_wait += waited
        first_wait = waited if step == 0 else first_wait
        probe.phase("step")
        lr = lr_at(
            epoch * run.steps_per_epoch + min(step, run.steps_per_epoch - 1), base_lr=job.lr,
            steps_per_epoch=run.steps_per_epoch, epochs=job.epochs, warmup_epochs=job.lr_warmup_epochs,
            warmup_decay=tp.lr_warmup_decay, scheduler=tp.lr_scheduler, step_size=tp.lr_step_size,
            gamma=tp.lr_gamma, min_lr=tp.lr_min,
        )
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images = batch["image"]
        if run.crop_sizes is not None:  # the decode picked this epoch's size from Ray Data's pass count: check it
            size = size_for_epoch(run.crop_sizes, epoch)
            if step == 0 and images.shape[-1] != size and run.rank == 0:
                print(f"[train {job.arch}] epoch {epoch}: batches decoded at {images.shape[-1]} px, resized to "
                      f"{size} px on the device (Ray Data's pass count is not this epoch: a resumed run)", flush=True)
            images = resize_batch(images, size)
        x = normalize(images, tp.channels_last)  # (N, 3, H, W) float32
        y = batch["label"]
        x, target = mix_batch(x, y, job.num_classes, tp.mixup_alpha, tp.cutmix_alpha, run.mix_rng)
        if tp.deterministic and device.type == "cuda" and target.dtype == torch.int64:
            # NLLLoss (cross-entropy on class indices) has no deterministic CUDA kernel and would raise under
            # use_deterministic_algorithms; on one-hot probabilities it is the same loss (label smoothing too).
            target = nn.functional.one_hot(target, job.num_classes).to(torch.float32)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            logits = run.model(x)
            loss = run.criterion(logits.float(), target)
        finite = run.watch.update(loss, step)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        measure = measure_epoch and step == run.steps_per_epoch - 1  # the epoch's last batch
        if tp.clip_grad_norm or measure:
            run.scaler.unscale_(run.optimizer)  # a no-op when the scaler is off
        if measure:
            probe.phase("grad_stats")
            grad_stats = job.grad_stats(run.core, x)  # the raw gradients: before clipping and the step
            probe.phase("step")
        if tp.clip_grad_norm:
            nn.utils.clip_grad_norm_(run.model.parameters(), tp.clip_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.step(run.core, epoch, step)
        n = y.shape[0]
        loss_sum += torch.where(finite, loss.detach().double() * n, torch.zeros_like(loss_sum))
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        step += 1
        probe.phase("between_steps")
        run.watch.poll(epoch, step, f"arch {job.arch}, lr {lr:.4g}")
        _maybe_inject_failure(epoch, step, run.rank)
        t_fetch = time.perf_counter()
    probe.phase("epoch_end")
    timing = {"train": time.perf_counter() - t0, "wait": data_wait, "first": first_wait}
    return {"loss_sum": loss_sum, "seen": seen, "correct": correct, "lr": lr}, grad_stats, timing


def _val_batches(run: _Run, val_source: Any) -> NextEpoch:
    return NextEpoch(lambda: val_source.iter_torch_batches(
        batch_size=run.p.eval.batch_size, dtypes={"image": torch.uint8, "label": torch.int64},
        device=run.device, pin_memory=run.device.type == "cuda", prefetch_batches=2,
    ))


def _validate(run: _Run, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Top-1/top-5 counts and the image count (int64 (3,), on the device) over this rank's part of the val set,
    through the evaluation stage's forward pass (`eval_logits`: same decode, normalisation and autocast dtype).
    Padding rows (label -1, which make every rank's part the same size) are not counted."""
    probe.phase("validate")
    tp = run.p.train
    model = run.ema.module if run.ema is not None else run.core
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=run.device)
    for batch in batches:
        y = batch["label"]
        logits = eval_logits(model, batch["image"], channels_last=tp.channels_last, amp_dtype=run.amp_dtype)
        counts[:2] += topk_counts(logits, y, (1, 5))
        counts[2] += (y >= 0).sum()
    probe.phase("epoch_end")
    return counts


def _epoch_metrics(run: _Run, epoch: int, sums: dict[str, Any], val_counts: torch.Tensor | None,
                   timing: dict[str, float], t0: float, last_val: tuple[float, float, int]) -> dict[str, Any]:
    """The epoch's metrics from ONE all-reduce of every rank's sums (exact counts, mean timings); raises on
    divergence on every rank at once."""
    job, world_size = run.job, run.world_size
    zero = torch.zeros(3, dtype=torch.int64, device=run.device)
    vc = val_counts if val_counts is not None else zero
    totals = dist.sum_across(
        [sums["loss_sum"], sums["seen"], sums["correct"], vc[0], vc[1], vc[2],
         (run.watch.worst > run.watch.allowed).to(torch.int64),  # summed: > 0 iff some rank diverged
         timing["train"], timing["wait"], timing["val"], timing["first"]],
        run.device,
    )
    loss_sum, seen, correct, c1, c5, nval, diverged_ranks = totals[:7]
    mean_train, mean_wait, mean_val, mean_first = (max(v / world_size, 1e-9) for v in totals[7:11])
    if diverged_ranks > 0:  # every rank sees the same sum, so all take this branch and raise together
        first = -dist.max_across([-float(run.watch.first_bad) if run.watch.worst > run.watch.allowed
                                  else -math.inf], run.device)[0]
        run.watch.raise_if_diverged(
            run.watch.allowed + 1, first, epoch,
            f"arch {job.arch}, lr {sums['lr']:.4g}, {int(diverged_ranks)} of {world_size} rank(s)")
    if val_counts is not None and job.n_val and int(nval) != job.n_val:
        raise RuntimeError(f"validation counted {int(nval)} images; the manifest has {job.n_val}")
    if val_counts is not None:
        val_top1, val_top5, val_images = 100.0 * (1 - c1 / max(nval, 1)), 100.0 * (1 - c5 / max(nval, 1)), int(nval)
    else:
        val_top1, val_top5, val_images = last_val  # not validated this epoch (train.val_every_epochs)
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_top1_err": 100.0 * (1 - correct / max(seen, 1)),
        "val_top1_err": val_top1,
        "val_top5_err": val_top5,
        "val_images": val_images,
        "val_score": rank_score(val_top1, loss_sum / max(seen, 1), val_images),
        "lr": sums["lr"] if seen else job.lr,
        "images_per_s": seen / mean_train,
        "epoch_time_s": time.perf_counter() - t0,
        "data_wait_s": mean_wait,
        "data_first_batch_s": mean_first,
        "val_time_s": mean_val,
    }
    if not math.isfinite(metrics["train_loss"]):
        raise TrainingDiverged(
            f"non-finite mean training loss at epoch {epoch} (arch {job.arch}, lr {metrics['lr']:.4g})")
    return metrics


def rank_score(top1_err: float, train_loss: float, n_images: int) -> float:
    """The one number a tune search ranks trials by (ASHA takes a single metric): the validation top-1 error in
    percent, ties broken by the epoch's mean training loss. The tie-break adds less than half of one image's
    share of the error (100 / n_images %), so it never reorders two different errors. Why: on a small minival
    many trials tie after one epoch (at chance, say), and ASHA stops a trial only when it is strictly worse than
    its rung's cutoff, so on error alone it would stop none of them."""
    step = 100.0 / max(n_images, 1)
    return top1_err + 0.5 * step * (1.0 - math.exp(-max(train_loss, 0.0)))


def _maybe_inject_failure(epoch: int, step: int, rank: int) -> None:
    """Test hook: PIPELINE_KILL_WORKER="EPOCH,STEP,RANK,MARKER" kills this worker process once (no clean-up,
    like an OOM kill or a lost node) so tests can prove the run resumes from its checkpoint."""
    spec = os.environ.get("PIPELINE_KILL_WORKER")
    if not spec:
        return
    e, s, r, marker = spec.split(",", 3)
    if (epoch, step, rank) == (int(e), int(s), int(r)) and not os.path.exists(marker):
        Path(marker).write_text(f"killed at epoch {epoch} step {step} rank {rank}\n")
        os._exit(137)


def _checkpoint_and_report(run: _Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Every rank reports once per epoch (Train V2 synchronises on it); only rank 0 attaches the checkpoint
    and writes to MLflow. Every rank's RNG streams travel to rank 0 first (two all-gathers), so the checkpoint
    resumes each rank's streams."""
    probe.phase("checkpoint")
    job, p = run.job, run.p
    rng = dist.all_gather_objects(_rng_state(run), run.device)
    if run.rank != 0:
        run.session.report(metrics, None)
        probe.phase("epoch_end")
        return
    state = {
        "model": run.core.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "epoch": epoch,
        "history": run.history,
        "resumed_at": run.resumed_at,  # epochs at which a restarted worker group or driver picked the run up
        "rng": rng,  # per rank: {"cpu", "cuda", "mix"}
        "arch": job.arch,
        "model_kwargs": model_kwargs(p, job.arch),
        "num_classes": job.num_classes,
        "classes": job.classes,
        "class_names": job.class_names,
        "eval_transform": {
            "resize": p.train.val_resize_size, "crop": p.train.val_crop_size,
            "interpolation": "bilinear", "antialias": True,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        },
        "config": job.params,
        "lr": job.lr,
        "lr_warmup_epochs": job.lr_warmup_epochs,
        "git_commit": job.git_commit,
        "data_fingerprint": job.data_fingerprint,
        # Where those data are (absolute: train_arch resolves it): `python -m pipeline evaluate` defaults to it.
        "shards_dir": (job.params.get("data") or {}).get("shards_dir"),
    }
    if job.mlflow_run_id:
        tracking.log_metrics(job.mlflow_run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
    if job.checkpoint_dir:
        # In-process runs: nothing copies the checkpoint, so one directory per run is rewritten each epoch
        # and is itself the checkpoint.
        save_train_state(job.checkpoint_dir, state)
        run.session.report(metrics, job.checkpoint_dir)
    elif getattr(run.session, "keeps_checkpoint_dir", False):
        tmp = tempfile.mkdtemp(prefix="resnet-ckpt-")
        save_train_state(tmp, state)
        run.session.report(metrics, tmp)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            save_train_state(tmp, state)
            run.session.report(metrics, tmp)
    probe.phase("epoch_end")
