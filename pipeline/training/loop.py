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
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.data.transforms import normalize, val_image
from pipeline.evaluation import topk_correct
from pipeline.training import dist
from pipeline.training.checkpoint import load_train_state, save_train_state
from pipeline.training.optim import build_optimizer, mix_batch
from pipeline.training.schedule import lr_at


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
    class_names: dict[str, str] = field(default_factory=dict)
    data_fingerprint: str = ""
    git_commit: str = "unknown"
    mlflow_run_id: str | None = None
    threads: int = 1
    pretrained_path: str | None = None  # torchvision weights to start from (train.pretrained)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def model_kwargs(p: Params, arch: str) -> dict[str, Any]:
    """The model.* params this builder accepts: plain nets take no shortcut/zero-init, CIFAR nets keep the
    paper's option A unless model.shortcut is set explicitly."""
    from pipeline.models import model_info

    wanted = {
        "shortcut": p.model.shortcut,
        "zero_init_residual": p.model.zero_init_residual,
        "dropout": p.model.dropout,
        "checkpoint_activations": p.model.checkpoint_activations,
    }
    accepted = model_info(arch)["defaults"]
    return {k: v for k, v in wanted.items() if k in accepted and v is not None}


def _build_model(job: Job, p: Params) -> nn.Module:
    from pipeline.models import build_model

    model = build_model(job.arch, num_classes=job.num_classes, **model_kwargs(p, job.arch))
    if job.pretrained_path:  # fine-tuning: torchvision's backbone, a fresh head for other classes
        from pipeline.models.pretrained import init_from_pretrained, load_state_dict

        init_from_pretrained(model, load_state_dict(job.pretrained_path))
    return model


def _amp(p: Params, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler)."""
    if p.train.amp == "off":
        return None, False
    if p.train.amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def evaluate_files(
    model: nn.Module, files: list[str], resize: int, crop: int, batch_size: int, device: torch.device,
    channels_last: bool, amp_dtype: torch.dtype | None,
) -> tuple[int, int, int]:
    """(top1 correct, top5 correct, images) over the given val shard files, every row exactly once."""
    from pipeline.data.shards import read_shard

    c1 = c5 = n = 0
    model.eval()
    with torch.no_grad():
        for path in files:
            table = read_shard(path, columns=["image", "label"])  # sha256 checked while read
            images = table.column("image").to_pylist()
            labels = table.column("label").to_numpy()
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.stack([val_image(b, resize, crop) for b in images[i : i + batch_size]]))
                y = torch.from_numpy(labels[i : i + batch_size].astype(np.int64)).to(device)
                x = normalize(x.to(device), channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)
                top1, top5 = topk_correct(logits.float(), y, (1, 5))
                c1, c5, n = c1 + top1, c5 + top5, n + len(y)
    return c1, c5, n


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

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)


class TuneTrialSession:
    """A Tune trial that trains in its own process (tune.workers_per_trial: 0): Tune's API instead of
    Train's, since Ray refuses ray.train.* inside a Tune function (ray-project/ray#49454)."""

    def __init__(self, dataset: Any) -> None:
        self._dataset = dataset
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def train_shard(self) -> Any:
        return self._dataset

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)  # ASHA reads this and may stop the trial here


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The TorchTrainer worker function."""
    run_loop(Job(**config), TrainSession())


def run_loop(job: Job, session: Any) -> None:
    """The training loop proper; `session` is where data comes from and reports go."""
    p = Params.model_validate(job.params)
    tp = p.train
    torch.set_num_threads(job.threads)
    rank, world_size = dist.world()
    torch.manual_seed(p.seed + rank)
    device = session.device
    memory_format = torch.channels_last if tp.channels_last else torch.contiguous_format

    model = _build_model(job, p).to(device=device, memory_format=memory_format)
    if tp.sync_bn and world_size > 1:
        if device.type == "cpu":  # torch's SyncBatchNorm raises on CPU tensors: say so once, train with plain BN
            if dist.is_rank0():
                print(f"[train {job.arch}] train.sync_bn ignored: SyncBatchNorm needs GPUs (per-worker BN on CPU)",
                      flush=True)
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world_size > 1:
        model = session.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    ema = None
    if tp.model_ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(tp.model_ema_decay), use_buffers=True)
    optimizer = build_optimizer(core, tp, job.lr)
    amp_dtype, use_scaler = _amp(p, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    train_fwd = torch.compile(model) if tp.compile else model

    start_epoch, history, resumed_at = 0, [], []
    checkpoint = session.checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_train_state(ckpt_dir)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        resumed_at = [*state.get("resumed_at", []), start_epoch]
        if dist.is_rank0():
            print(f"[train {job.arch}] resumed from checkpoint: epoch {start_epoch} of {job.epochs} done", flush=True)

    per_worker_batch = tp.batch_size // max(world_size, 1)
    # streaming_split(equal=True) gives every rank floor(n / world) rows; drop_last keeps steps equal.
    steps_per_epoch = max(job.n_train // max(world_size, 1) // per_worker_batch, 1)
    train_shard = session.train_shard()
    my_val_files = dist.shard_for_rank(job.val_files, rank, world_size)
    mix_gen = torch.Generator().manual_seed(p.seed + 7 * rank)

    def epoch_batches(epoch: int) -> NextEpoch:
        return NextEpoch(lambda: train_shard.iter_torch_batches(
            batch_size=per_worker_batch, drop_last=True, dtypes={"image": torch.uint8, "label": torch.int64},
            local_shuffle_buffer_size=4 * per_worker_batch, local_shuffle_seed=p.seed + 1000 * epoch + rank,
            device=device, prefetch_batches=2,
        ))

    next_batches = epoch_batches(start_epoch) if start_epoch < job.epochs else None
    for epoch in range(start_epoch, job.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, correct, step, nonfinite = 0.0, 0, 0, 0, 0
        # Off (the default): no extra work and no host sync. On: one batch per measured epoch, every rank alike
        # (no rank waits in a collective the others skip, SyncBN included); rank 0 reports.
        grad_stats: dict[str, float] = {}
        measure_epoch = tp.log_grad_stats and (epoch + 1) % tp.grad_stats_every_epochs == 0
        data_wait = 0.0  # seconds blocked on the input pipeline: > a few % of the epoch = input-bound
        t_fetch = time.perf_counter()
        assert next_batches is not None
        batches = next_batches
        first_wait = 0.0  # the epoch's start-up: Ray Data starts a new streaming execution every epoch
        for batch in batches:
            waited = time.perf_counter() - t_fetch
            data_wait += waited
            first_wait = waited if step == 0 else first_wait
            lr = lr_at(
                epoch * steps_per_epoch + min(step, steps_per_epoch - 1), base_lr=job.lr,
                steps_per_epoch=steps_per_epoch, epochs=job.epochs, warmup_epochs=job.lr_warmup_epochs,
                warmup_decay=tp.lr_warmup_decay, scheduler=tp.lr_scheduler, step_size=tp.lr_step_size,
                gamma=tp.lr_gamma, min_lr=tp.lr_min,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = normalize(batch["image"], tp.channels_last)  # (N, 3, H, W) float32
            y = batch["label"]
            x, target = mix_batch(x, y, job.num_classes, tp.mixup_alpha, tp.cutmix_alpha, mix_gen)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = train_fwd(x)
                loss = criterion(logits.float(), target)
            bad = not bool(torch.isfinite(loss))
            if dist.any_across(bad):
                nonfinite += 1
                if not use_scaler or nonfinite > MAX_CONSECUTIVE_NONFINITE:
                    raise FloatingPointError(
                        f"non-finite training loss at epoch {epoch} step {step} (arch {job.arch}, lr {lr:.4g}); "
                        "lower train.lr, raise lr_warmup_epochs or set train.clip_grad_norm"
                    )
            else:
                nonfinite = 0
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            measure = measure_epoch and step == steps_per_epoch - 1  # the epoch's last batch
            if tp.clip_grad_norm or measure:
                scaler.unscale_(optimizer)  # a no-op when the scaler is off
            if measure:
                grad_stats = gradient_stats(core, x)  # the raw gradients: before clipping and the step
            if tp.clip_grad_norm:
                nn.utils.clip_grad_norm_(model.parameters(), tp.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(core)
            n = y.shape[0]
            if not bad:
                loss_sum += float(loss.detach()) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += n
            step += 1
            _maybe_inject_failure(epoch, step, rank)
            t_fetch = time.perf_counter()
        train_time = time.perf_counter() - t0
        # The next epoch's data starts now, behind this epoch's validation and checkpoint.
        next_batches = epoch_batches(epoch + 1) if epoch + 1 < job.epochs else None
        t_val = time.perf_counter()
        eval_model = ema.module if ema is not None else core
        c1, c5, nval = evaluate_files(
            eval_model, my_val_files, tp.val_resize_size, tp.val_crop_size, p.eval.batch_size, device,
            tp.channels_last, amp_dtype,
        )
        val_time = time.perf_counter() - t_val
        totals = dist.sum_across(
            [loss_sum, seen, correct, c1, c5, nval, train_time, data_wait, val_time, first_wait]
        )
        loss_sum, seen, correct, c1, c5, nval = totals[:6]
        mean_train_time, mean_wait, mean_val, mean_first = (max(v / world_size, 1e-9) for v in totals[6:10])
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_top1_err": 100.0 * (1 - correct / max(seen, 1)),
            "val_top1_err": 100.0 * (1 - c1 / max(nval, 1)),
            "val_top5_err": 100.0 * (1 - c5 / max(nval, 1)),
            "val_images": int(nval),
            "lr": lr if seen else job.lr,
            "images_per_s": seen / mean_train_time,
            "epoch_time_s": time.perf_counter() - t0,
            "data_wait_s": mean_wait,
            "data_first_batch_s": mean_first,
            "val_time_s": mean_val,
        }
        if not math.isfinite(metrics["train_loss"]):
            raise FloatingPointError(f"non-finite mean training loss at epoch {epoch} (arch {job.arch})")
        history.append(metrics)
        # Gradient statistics travel with the epoch's metrics to MLflow and Ray, but stay out of `history`: the
        # per-epoch curve keeps its columns (and epochs without a measurement would lack them).
        _report(session, job, p, core, optimizer, scaler, ema, epoch + 1, history, {**metrics, **grad_stats},
                resumed_at)


def gradient_stats(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """MLflow metrics of one measured batch: `grad_norm/<layer>` (L2 norm of each conv/linear weight's
    gradient, as backward left it), `grad_norm/total` (their joint L2 norm), `dead_relu/<relu>.call<k>` (share
    of exact zeros at the k-th call of that ReLU on `images`, the model in its current mode) and
    `dead_relu/mean`. The paper (section 4.1) argues that with BN the plain nets' gradients stay healthy."""
    from pipeline.analysis.measure import dead_relu_ratio, gradient_norms

    norms = gradient_norms(model)
    dead = dead_relu_ratio(model, images)
    stats = {f"grad_norm/{name}": value for name, value in norms.items()}
    stats["grad_norm/total"] = math.sqrt(sum(value * value for value in norms.values()))
    # MLflow metric names allow no '#': "layer1.0.relu#2" -> "layer1.0.relu.call2".
    stats.update({f"dead_relu/{name.replace('#', '.call')}": value for name, value in dead.items()})
    if dead:
        stats["dead_relu/mean"] = sum(dead.values()) / len(dead)
    return stats


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


def _report(
    session: Any, job: Job, p: Params, core: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    ema: Any, epoch: int, history: list[dict[str, Any]], metrics: dict[str, Any], resumed_at: list[int],
) -> None:
    """Every rank reports once per epoch (Train V2 synchronises on it); only rank 0 attaches the checkpoint
    and writes to MLflow."""
    if not dist.is_rank0():
        session.report(metrics, None)
        return
    state = {
        "model": core.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "epoch": epoch,
        "history": history,
        "resumed_at": resumed_at,  # epochs at which a restarted worker group or driver picked the run up
        "rng": torch.get_rng_state(),
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
    }
    if job.mlflow_run_id:
        from pipeline import tracking

        tracking.log_metrics(job.mlflow_run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
    if job.extra.get("local_mode"):
        # In-process runs: nothing copies the checkpoint, so one directory per run is rewritten each epoch
        # and is itself the checkpoint.
        ckpt_dir = job.extra.setdefault("local_ckpt_dir", tempfile.mkdtemp(prefix="resnet-ckpt-"))
        save_train_state(ckpt_dir, state)
        session.report(metrics, ckpt_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_train_state(tmp, state)
        session.report(metrics, tmp)
