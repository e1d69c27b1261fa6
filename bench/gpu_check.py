"""`make gpu-check`: the GPU acceptance check, one command, under 6 minutes on one NVIDIA GPU.

Runs where Ray, MLflow and DVC are not installed (a bare Python with torch, torchvision, numpy, Pillow, pyarrow
and PyYAML, plus the small wheels `bench/fetch_gpu_wheels.sh` fetches): it imports none of the three, and
refuses them with an import hook so that a run on a full development venv fails the same way the GPU machine
would. Sections (each in its own try/except: one failure still writes the other records, and the exit code is
non-zero):

- `synthetic`:  ResNet-50 training on uint8 batches already on the GPU (batch 256 @224, channels_last, our
  optimiser): bf16 autocast vs fp16 + GradScaler, repetitions alternated, torch.cuda.synchronize() around the
  timed steps, warm-up excluded. The compute bound the other records are compared with.
- `train_loop`: our per-worker function `pipeline.training.loop.run_loop(job, session)` in this process on the
  GPU, under a single-rank process group (NCCL on GPU, gloo on CPU) with our collectives forced through it
  (`pipeline.training.dist.set_force_collectives`), so that a CPU tensor in a collective fails here as it would
  on 16 GPUs. The Job comes from `make_job` over generated ImageNet-size JPEG shards (`prepare_shards`), the
  session is `InProcessSession` over an `InMemoryShard` and an `InMemoryValShard`; bf16 for two epochs, then
  fp16 + GradScaler for one.
- `ddp`:        the model as run_loop builds it for several GPUs (channels_last, SyncBatchNorm-converted,
  DistributedDataParallel as ray.train.torch.prepare_model wraps it, torch.compile around the DDP module), a
  few bf16 steps in a single-rank group (NCCL / gloo), then the loop's collectives; every parameter, buffer,
  gradient, optimiser state, gradient bucket and collective tensor checked to be on the training device.
- `decode`:     our CPU decode (`pipeline.data.transforms.train_image`) in a process pool of all cores but one
  (a DataLoader, standing in for Ray Data's decode tasks), alone and feeding ResNet-50 training; both against
  the synthetic bound.
- `gpu_decode`: only where `torchvision.io.decode_jpeg(list, device="cuda")` works: batched nvJPEG decode +
  RandomResizedCrop on the GPU, against the CPU pool.
- `eval`:       the evaluation core (`pipeline.metrics.eval_logits` + `topk_counts`, what the loop's
  validation and the evaluate stage share) over the val shards, on batches resident on the GPU and end to end
  from an `InMemoryValShard`; the counts are checked (`topk_correct` on GPU and CPU agree).
- `compile`:    torch.compile'd vs eager training, bf16 and fp16 (last: compiling costs a minute or more).

Without a GPU (CI, laptops) the same code paths run at tiny sizes (resnet18 at 32 px, a few steps, gloo, a
couple of tiny shards) in well under a minute: every record then says `"gpu": null`,
`"measured_on_gpu": false`, and the summary says that nothing was measured on a GPU.

Records (`reports/gpu_check.json`, rewritten after every section, and written whatever fails: stdlib json, a
`gpu_check_start` record for a crash before the first section, `gpu_check_dependencies` for a module that does
not import) have `bench.common.record`'s shape, plus
`status` ("ok" / "error" / "skipped"), `error`, `section`, `gpu`, `measured_on_gpu`, `mode` and settings;
`machine` names the GPU and its driver. Exit code: 0 all ok, 1 a section failed, 3 a section was skipped
because the time budget ran out.

    python -m bench.gpu_check [--quick] [--out reports/gpu_check.json] [--sections synthetic,train_loop,...]
                              [--cpu] [--budget-s S] [--hard-limit-s S]
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import importlib.abc
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import RECORD_KEYS, load1, machine, median_spread, paired_ratios, record

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "imagenet-resnet50.yaml"
DEFAULT_OUT = "reports/gpu_check.json"
SECTIONS = ("synthetic", "train_loop", "ddp", "decode", "gpu_decode", "eval", "compile")
# Not on the GPU acceptance machine: importing any of them there is a crash, so here it is refused too.
FORBIDDEN_IMPORTS = ("ray", "mlflow", "dvc")
# Test hook (like PIPELINE_KILL_WORKER): GPU_CHECK_INJECT_FAILURE=SECTION raises at that section's start, so a
# test can prove that the other sections still write their records and the exit code says a section failed.
INJECT_ENV = "GPU_CHECK_INJECT_FAILURE"
# GPU_CHECK_INJECT_HANG=SECTION makes that section wait forever, so a test proves the watchdog stops the run at
# the hard limit and keeps the records, whatever the machine's speed.
HANG_ENV = "GPU_CHECK_INJECT_HANG"
EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3
GPU_BUDGET = (300.0, 345.0)  # (no section starts after, the watchdog stops everything at) seconds
CPU_BUDGET = (600.0, 700.0)
LR = 0.1  # the paper's lr for batch 256
AMP_DTYPES = ("bf16", "fp16")


# ------------------------------------------------------------------------------------------ import guard


class RefuseImports(importlib.abc.MetaPathFinder):
    """A meta path finder that refuses ray/mlflow/dvc (and their submodules) and remembers each attempt."""

    def __init__(self, names: tuple[str, ...] = FORBIDDEN_IMPORTS) -> None:
        self.names = names
        self.refused: list[str] = []

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            self.refused.append(fullname)
            raise ModuleNotFoundError(
                f"gpu-check: import of {fullname!r} refused: the GPU acceptance machine has no "
                f"{', '.join(self.names)}; keep them out of this code path", name=fullname,
            )
        return None


def install_import_guard() -> RefuseImports:
    """Install the guard once per process (first on sys.meta_path, ahead of the real finders)."""
    for finder in sys.meta_path:
        if isinstance(finder, RefuseImports) or type(finder).__name__ == "RefuseImports":
            return finder  # type: ignore[return-value]
    already = sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN_IMPORTS)
    if already:
        raise RuntimeError(f"gpu-check: {already[:3]} imported before the check started (run it as its own process)")
    guard = RefuseImports()
    sys.meta_path.insert(0, guard)
    return guard


def forbidden_loaded() -> list[str]:
    return sorted(m for m in sys.modules if m.partition(".")[0] in FORBIDDEN_IMPORTS)


# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check, its --quick variant and the CPU plumbing check."""

    arch: str
    batch: int
    crop: int
    val_resize: int
    num_classes: int  # synthetic sections: the ImageNet head
    train_per_class: int
    val_per_class: int
    image_wh: tuple[int, int] | None  # None: ImageNet-like 500x330..375, a fifth portrait (bench_ingest's mix)
    rows_per_shard: int
    loop_epochs: int
    loop_images: int  # train images per run_loop epoch (a multiple of batch)
    decode_images: int | None  # train images per decode pass (None: all)
    warmup: int
    steps: int
    reps: int
    compile_backend: str
    compile_amps: tuple[str, ...]
    compile_estimate_s: float  # before the first compile: how long one amp's compile + timing may take
    min_scale: float  # RandomResizedCrop's lower scale bound
    chunk: int  # images per decode task
    decode_passes: int  # passes over the train images per timed repetition
    eval_batch: int


GPU_SIZES = Sizes(
    arch="resnet50", batch=256, crop=224, val_resize=256, num_classes=1000,
    train_per_class=600, val_per_class=100, image_wh=None, rows_per_shard=256,  # 3,000 + 500 JPEGs, 5 classes
    loop_epochs=2, loop_images=2560, decode_images=None, warmup=15, steps=20, reps=5,
    compile_backend="inductor", compile_amps=AMP_DTYPES, compile_estimate_s=120, min_scale=0.08, chunk=64,
    decode_passes=2, eval_batch=256,
)
GPU_QUICK = replace(
    GPU_SIZES, train_per_class=160, val_per_class=20, loop_images=768, warmup=5, steps=10, reps=3,
    compile_amps=("bf16",), decode_passes=1,
)
# The CPU plumbing check: the same code at sizes that run in seconds on 2 cores. autocast on a CPU without bf16
# hardware is slow (seconds per resnet18 step at batch 8, 32 px, on a 2-core CI machine), hence the smallest
# ResNet of the project (CIFAR resnet20, 0.27 M parameters) at 16 px, batch 4 and one or two steps per
# measurement; torch.compile uses the "eager" backend (Dynamo's capture without C++ codegen: inductor would
# compile for minutes here).
CPU_SIZES = Sizes(
    arch="resnet20", batch=4, crop=16, val_resize=18, num_classes=10, train_per_class=4, val_per_class=4,
    image_wh=(64, 48), rows_per_shard=8, loop_epochs=2, loop_images=8, decode_images=8, warmup=1, steps=1, reps=2,
    compile_backend="eager", compile_amps=("bf16",), compile_estimate_s=60, min_scale=0.35, chunk=4,
    decode_passes=1, eval_batch=8,
)


# ------------------------------------------------------------------------------------------------ context


@dataclass
class Data:
    raw: Path
    shards: Path
    manifest: dict[str, Any]
    train_files: list[str]
    val_files: list[str]
    n_train: int
    n_val: int
    num_classes: int
    seconds: float


class SectionSkipped(Exception):
    """Raised inside a section for one measurement the time budget no longer allows."""


@dataclass
class Ctx:
    args: argparse.Namespace
    sizes: Sizes
    device: Any  # torch.device
    gpu: str | None
    driver: str | None
    machine_suffix: str
    guard: RefuseImports
    tmp: Path
    t0: float = field(default_factory=time.perf_counter)
    load_before: float = field(default_factory=load1)
    records: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    current: str = "start"
    data_: Data | None = None
    data_error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[gpu-check {self.elapsed():6.1f}s] {self.current}: {msg}", flush=True)

    def can_start(self, estimate_s: float = 0.0) -> bool:
        """New work starts only before the budget is spent and when its estimate ends before the hard limit."""
        e = self.elapsed()
        return e < self.args.budget_s and e + estimate_s < self.args.hard_limit_s - 10

    # -- records

    def _common(self, section: str) -> dict[str, Any]:
        s = self.sizes
        return {
            "section": section,
            "status": "ok",
            "error": None,
            "gpu": self.gpu,
            "gpu_driver": self.driver,
            "measured_on_gpu": self.on_gpu,
            "mode": ("gpu" if self.on_gpu else "cpu-plumbing") + ("-quick" if self.args.quick else ""),
            "arch": s.arch,
            "batch": s.batch,
            "crop": s.crop,
        }

    def add(self, name: str, value: float, unit: str, baseline_name: str, baseline_value: float, n_runs: int,
            spread: list[float], **extra: Any) -> dict[str, Any]:
        """A record in bench.common.record's shape, the GPU (or its absence) in `machine`."""
        fields = {**self._common(self.current), **extra}
        rec = record(name, value, unit, baseline_name, baseline_value, n_runs, spread, load_before=self.load_before,
                     **fields)
        rec["machine"] += self.machine_suffix
        self._append(rec)
        self.log(f"{name}: {rec['value']:g} {unit} vs {rec['baseline_value']:g} ({baseline_name}), "
                 f"ratio {rec['ratio']:.3f}")
        return rec

    def add_problem(self, name: str, status: str, message: str, **extra: Any) -> dict[str, Any]:
        """A record with the fixed keys present and null, the error (or why it was skipped) in it."""
        rec: dict[str, Any] = {k: None for k in RECORD_KEYS}
        rec.update(name=name, machine=machine(self.load_before) + self.machine_suffix, n_runs=0)
        rec.update(self._common(self.current))
        rec.update(status=status, error=message, **extra)
        self._append(rec)
        return rec

    def _append(self, rec: dict[str, Any]) -> None:
        rec["refused_imports"] = list(self.guard.refused)
        with self.lock:
            self.records = [r for r in self.records if r["name"] != rec["name"]] + [rec]

    def write(self) -> None:
        """Rewrite the report with this run's records only (an acceptance run must not inherit old ones)."""
        # Plain stdlib, not `pipeline.runtime.write_json` (pyarrow's filesystem layer): the report must be
        # written even when a missing or broken pyarrow is the failure it records.
        import json

        with self.lock:
            out = Path(self.args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(self.records, indent=2, default=str) + "\n")
            os.replace(tmp, out)

    @contextlib.contextmanager
    def item(self, name: str) -> Iterator[None]:
        """One measurement: its failure becomes an error record named `name`; the section goes on."""
        try:
            yield
        except SectionSkipped as exc:
            self.log(f"{name}: SKIPPED ({exc})")
            self.add_problem(name, "skipped", str(exc))
        except Exception as exc:  # noqa: BLE001 (recorded, and the exit code says so)
            self.log(f"{name}: FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            self.add_problem(name, "error", f"{type(exc).__name__}: {exc}", traceback=_tail(traceback.format_exc()))

    def baseline(self, key: str, fallback_name: str) -> tuple[str, float, bool]:
        """(baseline name, value, found): a bound measured by an earlier section, or a stand-in of 1.0."""
        names = {"synthetic_bf16": "train_synthetic_bf16", "synthetic_fp16": "train_synthetic_fp16_gradscaler",
                 "cpu_decode": "cpu_decode_pool"}
        if key in self.results:
            return names.get(key, key), self.results[key], True
        return f"none ({fallback_name} did not run)", 1.0, False

    def data(self) -> Data:
        """The generated JPEG tree and its shards, made once, on first use."""
        if self.data_ is None and self.data_error is None:
            try:
                self.data_ = make_data(self)
            except BaseException as exc:
                self.data_error = exc
                raise
        if self.data_error is not None:
            raise RuntimeError(f"the generated shards are not there: {self.data_error}") from self.data_error
        assert self.data_ is not None
        return self.data_


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------- GPU facts


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi, else the kernel module's /proc file), None when neither says."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8")
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    return None


def gpu_facts(force_cpu: bool) -> tuple[Any, str | None, str | None, str]:
    """(device, GPU name or None, driver version, the text appended to every record's `machine`)."""
    import torch

    if force_cpu or not torch.cuda.is_available():
        why = "--cpu" if force_cpu else "torch.cuda.is_available() is False"
        return (torch.device("cpu"), None, None,
                f"; GPU: none ({why}): CPU plumbing check, NOTHING measured on a GPU")
    torch.cuda.set_device(0)
    props = torch.cuda.get_device_properties(0)
    driver = nvidia_driver()
    cuda_driver = ""
    with contextlib.suppress(Exception):  # the CUDA driver API's version, private in torch: best effort
        v = int(torch._C._cuda_getDriverVersion())
        cuda_driver = f", CUDA driver API {v // 1000}.{v % 1000 // 10}"
    suffix = (f"; GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}), "
              f"NVIDIA driver {driver or 'unknown'}{cuda_driver}, torch CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.device_count()} visible")
    return torch.device("cuda", 0), props.name, driver, suffix


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def release_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def peak_gib(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


# ---------------------------------------------------------------------------------------------- data


def _tree_jobs(s: Sizes, seed: int = 0) -> list[tuple[str, int, int, int]]:
    """(relative path, width, height, seed) of every JPEG of the `folders` layout (train/<wnid>/, val/<wnid>/)."""
    import numpy as np

    from bench.bench_ingest import WNIDS

    rng = np.random.default_rng(seed)
    jobs = []
    for wnid in WNIDS:
        for split, count in (("train", s.train_per_class), ("val", s.val_per_class)):
            for i in range(count):
                if s.image_wh is not None:
                    w, h = s.image_wh
                else:  # ImageNet's typical landscape 500x375, a portrait now and then (as bench_ingest)
                    w, h = (375, 500) if rng.uniform() < 0.2 else (500, int(rng.integers(330, 376)))
                jobs.append((f"{split}/{wnid}/{wnid}_{split}_{i:04d}.JPEG", w, h, int(rng.integers(2**31))))
    return jobs


def make_data(ctx: Ctx) -> Data:
    """Photo-like JPEGs (bench.bench_ingest's generator) -> `prepare_shards` with the ImageNet preset's
    max_side: the shard format and sizes our GPU runs read."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from bench.bench_ingest import _write_images
    from pipeline.config import load_params
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.shards import shard_files

    t0 = time.perf_counter()
    s = ctx.sizes
    raw, shards = ctx.tmp / "raw", ctx.tmp / "shards"
    jobs = _tree_jobs(s)
    # A few hundred small images are written faster here than a process pool starts.
    procs = 1 if len(jobs) < 500 else cores()
    ctx.log(f"generating {len(jobs)} JPEGs with {procs} process(es)")
    if procs == 1:
        _write_images((str(raw), jobs))
    else:  # forkserver: this process may already hold CUDA and threads, which a forked child must not inherit
        with ProcessPoolExecutor(procs, mp_context=get_context("forkserver")) as pool:
            list(pool.map(_write_images, [(str(raw), jobs[i::procs]) for i in range(procs)]))
    preset = load_params(PRESET)
    manifest = prepare_shards(
        raw, shards, source="folders", max_side=preset.data.max_side, jpeg_quality=preset.data.jpeg_quality,
        rows_per_shard=s.rows_per_shard, workers=procs, max_rejected=0, progress=False,
    )
    data = Data(
        raw=raw, shards=shards, manifest=manifest, train_files=shard_files(shards, "train", verify=True),
        val_files=shard_files(shards, "val", verify=True), n_train=int(manifest["splits"]["train"]["n_images"]),
        n_val=int(manifest["splits"]["val"]["n_images"]), num_classes=int(manifest["num_classes"]),
        seconds=time.perf_counter() - t0,
    )
    ctx.log(f"{data.n_train} train / {data.n_val} val images in {len(data.train_files)} + {len(data.val_files)} "
            f"shards ({data.seconds:.1f} s)")
    return data


class DecodeChunks:
    """A map-style dataset for a DataLoader process pool: item i is chunk i of the train shards' rows (a shuffled
    order, whole chunks only, as the loop drops the last partial batch), decoded and augmented with the
    project's `train_image` (RandomResizedCrop + flip) into {"image": uint8 (n, 3, crop, crop), "label": int64
    (n,)}. Each worker reads the JPEG bytes once, on its first item; only file names and the order are pickled."""

    def __init__(self, files: list[str], *, crop: int, min_scale: float, chunk: int, seed: int = 0,
                 limit: int | None = None) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        self.files, self.crop, self.min_scale, self.chunk, self.seed = list(files), crop, min_scale, chunk, seed
        n = sum(pq.read_metadata(f).num_rows for f in self.files)
        n = n if limit is None else min(n, limit)
        self.order = np.random.default_rng(seed).permutation(n)
        self.n_chunks = n // chunk
        self.n_images = self.n_chunks * chunk
        self._images: list[bytes] | None = None
        self._labels: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None, "_labels": None}

    def _load(self) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        images: list[bytes] = []
        labels: list[int] = []
        for path in self.files:
            table = pq.read_table(path, columns=["image", "label"])
            images += table.column("image").to_pylist()
            labels += table.column("label").to_pylist()
        self._images, self._labels = images, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return self.n_chunks

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch

        from pipeline.data.transforms import train_image

        if self._images is None:
            self._load()
        assert self._images is not None
        index = self.order[i * self.chunk : (i + 1) * self.chunk]
        rng = np.random.default_rng((self.seed, i))
        pixels = np.stack([train_image(self._images[j], self.crop, rng, self.min_scale) for j in index])
        return {"image": torch.from_numpy(pixels), "label": torch.from_numpy(self._labels[index])}


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers are fresh processes (forkserver): they refuse ray/mlflow/dvc as the parent does."""
    install_import_guard()


def shm_free() -> int | None:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


PREFETCH = 2  # chunks each decode worker keeps ready


def _shm_need(chunk: int, workers: int, crop: int) -> int:
    return workers * PREFETCH * chunk * 3 * crop * crop * 2  # x2: a chunk being received while the next is written


def fit_chunk(chunk: int, workers: int, crop: int) -> int:
    """The largest power-of-two share of `chunk` whose chunks in flight fit in half of /dev/shm's free space.

    Decoded chunks travel from the workers through /dev/shm, and containers often give it 64 MiB: smaller chunks
    then (more messages, same images) rather than a bus error."""
    free = shm_free()
    if free is None:
        return chunk
    while chunk > 1 and _shm_need(chunk, workers, crop) > free / 2:
        chunk //= 2
    return chunk


def decode_loader(ds: DecodeChunks, workers: int, device: Any, *, persistent: bool) -> Any:
    """A DataLoader over `ds` (one item = one chunk), forkserver workers, pinned memory on a GPU."""
    import torch

    prefetch = PREFETCH
    need = _shm_need(ds.chunk, workers, ds.crop)
    free = shm_free()
    if free is not None and need > free:
        raise RuntimeError(f"/dev/shm has {free / 2**20:.0f} MiB free, the decode pool needs ~{need / 2**20:.0f} MiB "
                           f"({workers} workers x {prefetch} chunks of {ds.chunk} images); rerun with a larger "
                           "/dev/shm (docker --shm-size) or fewer workers")
    return torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=persistent, prefetch_factor=prefetch, multiprocessing_context="forkserver",
        worker_init_fn=_worker_init,
    )


def decode_workers() -> int:
    """All cores but one: the main process feeds the GPU (and pins memory) on the last one."""
    return max(1, cores() - 1)


# ------------------------------------------------------------------------------------------ timed steps


class SyntheticTrainer:
    """One ResNet + our optimiser (`build_optimizer`, the preset's recipe) + GradScaler, one training step as
    `run_loop` takes it: normalise uint8 on the device, autocast forward, fp32 loss, (scaled) backward, step."""

    def __init__(self, ctx: Ctx, amp: str, compile_backend: str | None = None, seed: int = 0) -> None:
        import torch
        from torch import nn

        from pipeline.config import load_params
        from pipeline.models import build_model
        from pipeline.training.optim import build_optimizer

        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {AMP_DTYPES}")
        self.device = ctx.device
        torch.manual_seed(seed)
        model = build_model(ctx.sizes.arch, num_classes=ctx.sizes.num_classes)
        self.model = model.to(device=self.device, memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, load_params(PRESET).train, LR)
        self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.criterion = nn.CrossEntropyLoss()
        self.fwd = torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        self.nonfinite = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import torch

        from pipeline.data.transforms import normalize

        x = normalize(images, channels_last=True)
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = self.criterion(self.fwd(x).float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def synthetic_batch(ctx: Ctx) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    s = ctx.sizes
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.batch, 3, s.crop, s.crop), dtype=torch.uint8, generator=g)  # (N, 3, H, W)
    labels = torch.randint(0, s.num_classes, (s.batch,), generator=g)
    return images.to(ctx.device), labels.to(ctx.device)


def timed_steps(trainer: SyntheticTrainer, images: Any, labels: Any, steps: int) -> float:
    """images/s of `steps` steps; the device has finished every queued kernel before each clock reading."""
    import torch

    sync(trainer.device)
    t0 = time.perf_counter()
    loss = None
    for _ in range(steps):
        loss = trainer.step(images, labels)
    sync(trainer.device)
    seconds = time.perf_counter() - t0
    if loss is not None and not bool(torch.isfinite(loss)):
        trainer.nonfinite += 1
    return images.shape[0] * steps / seconds


def alternate(fns: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """The project's convention (bench.common): repetitions alternate which one goes first."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for rep in range(reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            rates[name].append(fns[name]())
    return rates


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.4g}") for v in values]


# ------------------------------------------------------------------------------------------- sections


def section_synthetic(ctx: Ctx) -> None:
    s = ctx.sizes
    images, labels = synthetic_batch(ctx)
    trainers = {amp: SyntheticTrainer(ctx, amp) for amp in AMP_DTYPES}
    for amp, tr in trainers.items():
        ctx.log(f"{amp}: {s.warmup} warm-up steps")
        timed_steps(tr, images, labels, s.warmup)
    rates = alternate({amp: functools.partial(timed_steps, tr, images, labels, s.steps)
                       for amp, tr in trainers.items()}, s.reps)
    bf16, bf16_spread = median_spread(rates["bf16"])
    fp16, fp16_spread = median_spread(rates["fp16"])
    ctx.results["synthetic_bf16"], ctx.results["synthetic_fp16"] = bf16, fp16
    ratios = paired_ratios(rates["bf16"], rates["fp16"])
    ctx.add(
        "train_synthetic_bf16_vs_fp16", bf16, "img/s", "train_synthetic_fp16_gradscaler", fp16, s.reps,
        [min(ratios), max(ratios)], size=s.crop, channels_last=True, warmup_steps=s.warmup, steps=s.steps,
        bf16_img_s=_rounded(rates["bf16"]), fp16_img_s=_rounded(rates["fp16"]),
        bf16_spread=_rounded(bf16_spread), fp16_spread=_rounded(fp16_spread),
        nonfinite_losses={amp: tr.nonfinite for amp, tr in trainers.items()},
        cudnn_benchmark=_cudnn_benchmark(), peak_memory_gib=peak_gib(ctx.device),
        setup=f"{s.arch}, uint8 batches resident on the device, normalised there; our optimiser "
              f"(configs/imagenet-resnet50.yaml, lr {LR}); torch.autocast; fp16 with torch.amp.GradScaler",
    )


def _cudnn_benchmark() -> bool:
    import torch

    return bool(torch.backends.cudnn.benchmark)


COUNTED_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce")


class _CountCollectives:
    """Counts the collectives called through `torch.distributed.<name>` (dist.py looks them up on the module at
    each call): proof that the loop's sums went through the process group. A dist.py that imported the functions
    by name would escape the count; the error below says where to look."""

    def __init__(self) -> None:
        self.calls = 0
        self.devices: set[str] = set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import torch.distributed as torch_dist

        real = {name: getattr(torch_dist, name) for name in COUNTED_COLLECTIVES if hasattr(torch_dist, name)}

        def counting(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def wrapper(*a: Any, **kw: Any) -> Any:
                self.calls += 1
                for arg in (*a, *kw.values()):  # tensors, and lists of them (all_gather's outputs)
                    for t in arg if isinstance(arg, list | tuple) else [arg]:
                        if hasattr(t, "device") and hasattr(t, "dtype"):
                            self.devices.add(str(t.device))
                return fn(*a, **kw)

            return wrapper

        for name, fn in real.items():
            setattr(torch_dist, name, counting(fn))
        try:
            yield
        finally:
            for name, fn in real.items():
                setattr(torch_dist, name, fn)


@contextlib.contextmanager
def forced_collectives() -> Iterator[str]:
    """`dist.set_force_collectives(True)` for the block: at world size 1 the loop's collectives would otherwise
    be skipped, and a CPU tensor in one would only fail on a multi-GPU run."""
    from pipeline.training import dist

    dist.set_force_collectives(True)
    try:
        yield "pipeline.training.dist.set_force_collectives(True)"
    finally:
        dist.set_force_collectives(False)


@contextlib.contextmanager
def single_rank_group(ctx: Ctx) -> Iterator[str]:
    """A process group of one rank over TCP on 127.0.0.1: NCCL on a GPU, gloo on CPU."""
    import torch.distributed as torch_dist

    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    if torch_dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        torch_dist.destroy_process_group()


def loop_params(ctx: Ctx, amp: str, epochs: int) -> Any:
    """The ImageNet preset, resized for this check: one in-process worker on this device."""
    from pipeline.config import load_params, with_absolute_paths

    s, data = ctx.sizes, ctx.data()
    overrides = [
        f"data.shards_dir={data.shards}", f"train.storage_path={ctx.tmp / 'ray_results'}",
        f"train.epochs={epochs}", f"train.batch_size={s.batch}", f"train.lr={LR}", "train.lr_warmup_epochs=0",
        # cpus_per_worker is run_loop's torch thread count: the CPU check keeps its one thread (see main).
        "train.num_workers=0", f"train.cpus_per_worker={cores() if ctx.on_gpu else 1}", f"train.use_gpu={ctx.on_gpu}",
        "train.compile=false", "train.use_tuned=false", f"train.amp={amp}", f"train.train_crop_size={s.crop}",
        f"train.val_resize_size={s.val_resize}", f"train.val_crop_size={s.crop}", f"eval.batch_size={s.eval_batch}",
        f"model.archs=[{s.arch}]", f"train.train_crop_min_scale={s.min_scale}",
    ]
    return with_absolute_paths(load_params(PRESET, overrides), ROOT)


def make_session(ctx: Ctx, job: Any, p: Any, images: int) -> Any:
    """InProcessSession over an InMemoryShard of `images` train rows and an InMemoryValShard of every val row
    (the loop validates from it, with the evaluate stage's decode)."""
    from pipeline.training.local import InMemoryShard, InMemoryValShard, InProcessSession

    shard = InMemoryShard(job.train_files, crop=p.train.train_crop_size, min_scale=p.train.train_crop_min_scale,
                          limit=images)
    val = InMemoryValShard(job.val_files, resize=p.train.val_resize_size, crop=p.train.val_crop_size)
    return InProcessSession(shard, device=ctx.device, val_shard=val)


def run_loop_once(ctx: Ctx, amp: str, epochs: int, counter: _CountCollectives, forced: str, backend: str) -> None:
    import torch

    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    s, data = ctx.sizes, ctx.data()
    p = loop_params(ctx, amp, epochs)
    job = make_job(p, s.arch, LR, 0, epochs, None)
    session = make_session(ctx, job, p, s.loop_images)
    n_shard = len(session.train_shard())
    if n_shard < s.batch:
        raise RuntimeError(f"{n_shard} train images < batch {s.batch}: not one full batch")
    job.n_train = n_shard
    ckpt = ctx.tmp / f"ckpt-{amp}"
    ckpt.mkdir(exist_ok=True)
    job.checkpoint_dir = str(ckpt)  # the loop rewrites it each epoch
    threads = torch.get_num_threads()
    calls_before = counter.calls
    counter.devices.clear()  # this run's tensors only
    ctx.log(f"run_loop {s.arch} amp={amp}: {epochs} epoch(s) of {n_shard // s.batch} steps, {backend} group")
    t0 = time.perf_counter()
    try:
        run_loop(job, session)
    except RuntimeError as exc:
        if backend == "nccl" and "cpu" in str(exc).lower():  # what this section exists to catch: say so plainly
            raise RuntimeError(f"a collective got a CPU tensor under NCCL (tensor devices seen: "
                               f"{sorted(counter.devices)}): {exc}") from exc
        raise
    finally:
        torch.set_num_threads(threads)  # run_loop sets the process's thread count
    wall = time.perf_counter() - t0
    reports = session.reports
    calls = counter.calls - calls_before
    problems = []
    if len(reports) != epochs:
        problems.append(f"{len(reports)} epoch reports, expected {epochs}")
    for r in reports:
        if int(r["val_images"]) != data.n_val:
            problems.append(f"epoch {r['epoch']} evaluated {r['val_images']} val images, the manifest has "
                            f"{data.n_val} (every val image exactly once)")
        if not math.isfinite(float(r["train_loss"])):
            problems.append(f"epoch {r['epoch']}: train_loss {r['train_loss']}")
    if calls == 0:
        problems.append(f"no collective ({', '.join(COUNTED_COLLECTIVES)}) went through torch.distributed: "
                        "collectives were not forced (or dist.py no longer calls them as torch.distributed.<name>), "
                        "so a CPU tensor in a collective would go unnoticed")
    off_device = sorted(d for d in counter.devices if d.partition(":")[0] != ctx.device.type)
    if off_device:
        problems.append(f"collectives got tensors on {off_device}, the training device is {ctx.device}")
    if not session.checkpoint_dir:
        problems.append("no checkpoint was reported")
    if problems:
        raise AssertionError("; ".join(problems))
    steady = [float(r["images_per_s"]) for r in reports[1:]] or [float(reports[0]["images_per_s"])]
    value, spread_abs = median_spread(steady)
    key = f"synthetic_{amp}"
    base_name, base, found = ctx.baseline(key, "the synthetic section")
    ctx.add(
        f"run_loop_{amp}_vs_synthetic", value, "img/s", base_name, base, len(steady),
        [spread_abs[0] / base, spread_abs[1] / base], amp=amp, backend=backend, world_size=1,
        collectives_forced=forced, collective_calls=calls, collective_devices=sorted(counter.devices),
        val_source="InMemoryValShard", epochs=epochs, steps_per_epoch=n_shard // s.batch, n_train=n_shard,
        n_val=data.n_val, wall_s=round(wall, 1), images_per_s_by_epoch=_rounded([r["images_per_s"] for r in reports]),
        history=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in reports],
        timed_epochs="epochs after the first" if len(reports) > 1 else "the only epoch (includes warm-up)",
        baseline_found=found, peak_memory_gib=peak_gib(ctx.device),
        setup=f"pipeline.training.loop.run_loop in this process: InMemoryShard (train_image decoded serially in "
              f"this process: decode-bound by design, unlike Ray Data's parallel ingest) + InMemoryValShard, Job "
              f"from make_job over {len(job.train_files)} train shards; images_per_s is the loop's own (train "
              "steps incl. data waits)",
    )


def section_train_loop(ctx: Ctx) -> None:
    ctx.data()  # data first: its failure is the section's, not one run's
    counter = _CountCollectives()
    with single_rank_group(ctx) as backend, counter.installed(), forced_collectives() as forced:
        with ctx.item("run_loop_bf16_vs_synthetic"):
            run_loop_once(ctx, "bf16", ctx.sizes.loop_epochs, counter, forced, backend)
        release_gpu()
        with ctx.item("run_loop_fp16_vs_synthetic"):
            run_loop_once(ctx, "fp16", 1, counter, forced, backend)
        release_gpu()


DDP_RECORD = "ddp_compiled_syncbn_vs_synthetic"
# What run_loop's epoch end issues through pipeline.training.dist (and what the ddp section calls in turn).
LOOP_COLLECTIVES = ("sum_tensor", "sum_across", "max_across", "all_gather_objects")


class _RecordBuckets:
    """A DDP comm hook: torch's own `default_hooks.allreduce_hook` (all-reduce each gradient bucket, divide by
    the world size: what DDP does without a hook), counting the buckets and the devices of their tensors."""

    def __init__(self) -> None:
        self.calls = 0
        self.devices: set[str] = set()

    def hook(self) -> Callable[..., Any]:
        """The function to register: DDP reads its name and refuses annotations other than torch's own (and
        this module's are strings), so it has none."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def recording_allreduce_hook(process_group, bucket):  # noqa: ANN001, ANN202
            self.calls += 1
            self.devices.add(str(bucket.buffer().device))
            return default_hooks.allreduce_hook(process_group, bucket)

        return recording_allreduce_hook


def _off_device(tensors: dict[str, Any], device: Any) -> list[str]:
    return sorted(f"{name} on {t.device}" for name, t in tensors.items() if t.device != device)


def section_ddp(ctx: Ctx) -> None:
    with ctx.item(DDP_RECORD):  # a failure or a skip is this record's, under its own name
        _ddp_check(ctx)
    release_gpu()


def _ddp_check(ctx: Ctx) -> None:
    """The multi-GPU model as `run_loop` builds it at world size > 1, at world size 1 under a real process group
    (NCCL on a GPU, gloo on CPU): channels_last on the device, SyncBatchNorm-converted (GPU), wrapped in
    DistributedDataParallel as ray.train.torch.prepare_model wraps it, torch.compile'd around the DDP module;
    a few bf16 training steps with our optimiser, then every collective the loop's epoch end issues (forced at
    world size 1). Checked: every parameter, buffer, gradient, optimiser state, gradient bucket and collective
    tensor is on the training device; losses finite; the collectives went through the group and return what a
    one-rank sum, max and gather must."""
    import copy

    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import load_params
    from pipeline.data.transforms import normalize
    from pipeline.models import build_model
    from pipeline.training import dist
    from pipeline.training.optim import build_optimizer

    s, device = ctx.sizes, ctx.device
    estimate = s.compile_estimate_s
    if not ctx.can_start(estimate):
        raise SectionSkipped(f"time budget: {ctx.elapsed():.0f} s spent, ~{estimate:.0f} s more needed")
    counter, buckets = _CountCollectives(), _RecordBuckets()
    images, labels = synthetic_batch(ctx)
    problems: list[str] = []
    with single_rank_group(ctx) as backend, counter.installed(), forced_collectives() as forced:
        torch.manual_seed(0)
        model = build_model(s.arch, num_classes=s.num_classes).to(device=device, memory_format=torch.channels_last)
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            n_sync = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
            sync_bn = (f"nn.SyncBatchNorm.convert_sync_batchnorm: {n_sync} layers; at world size 1 torch normalises "
                       "locally (its statistics all-gather runs only with more than one rank)")
        else:  # as run_loop: SyncBatchNorm refuses CPU tensors in a process group (and DDP, CPU modules with it)
            n_sync = sum(isinstance(m, nn.SyncBatchNorm)
                         for m in nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).modules())
            sync_bn = (f"skipped on CPU: convert_sync_batchnorm gives {n_sync} SyncBatchNorm layers (checked on a "
                       "copy), but torch's SyncBatchNorm refuses CPU tensors in a process group (and DDP "
                       "refuses it in a CPU module), so run_loop trains with per-worker BatchNorm on CPU and so "
                       "does this check")
        if n_sync != n_bn or n_bn == 0:
            problems.append(f"convert_sync_batchnorm converted {n_sync} of {n_bn} BatchNorm layers")
        # ray.train.torch.prepare_model: DDP(model, device_ids=[the worker's GPU]) on a GPU, DDP(model) on CPU.
        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids)
        ddp.register_comm_hook(None, buckets.hook())
        core = ddp.module
        compiled = torch.compile(ddp, backend=s.compile_backend)
        optimizer = build_optimizer(core, load_params(PRESET).train, LR)
        criterion = nn.CrossEntropyLoss()
        ctx.log(f"{s.arch} SyncBN + DDP(device_ids={device_ids}) + torch.compile(backend={s.compile_backend!r}) "
                f"in a one-rank {backend} group; first step compiles")

        def step() -> Any:
            x = normalize(images, channels_last=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = criterion(compiled(x).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()

        losses = []
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        first_step_s = time.perf_counter() - t0
        for _ in range(s.warmup):
            losses.append(step())
        sync(device)
        t0 = time.perf_counter()
        for _ in range(s.steps):
            losses.append(step())
        sync(device)
        rate = s.batch * s.steps / (time.perf_counter() - t0)
        if not all(bool(torch.isfinite(loss)) for loss in losses):
            problems.append(f"non-finite losses: {[float(loss) for loss in losses]}")
        # The loop's epoch-end collectives, as run_loop issues them: one sum of device accumulators and numbers,
        # a max, the RNG gather, and a bare all-reduce.
        loss_sum = torch.stack(losses).double().sum()
        calls_before = counter.calls
        totals = dist.sum_across([loss_sum, len(losses) * s.batch, torch.ones((), dtype=torch.int64,
                                                                                device=device)], device)
        peak = dist.max_across([1.0, -2.0], device)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                                if device.type == "cuda" else {})}
        gathered = dist.all_gather_objects(rng, device)
        summed = dist.sum_tensor(torch.full((4,), 2.0, device=device))
        loop_calls = counter.calls - calls_before
        if not math.isclose(totals[0], float(loss_sum), rel_tol=1e-9) or totals[1:] != [len(losses) * s.batch, 1]:
            problems.append(f"sum_across over one rank returned {totals}")
        if peak != [1.0, -2.0] or summed.tolist() != [2.0] * 4 or summed.device != device:
            problems.append(f"max_across / sum_tensor over one rank returned {peak} / {summed}")
        if len(gathered) != 1 or not torch.equal(gathered[0]["cpu"], rng["cpu"]):
            problems.append("all_gather_objects over one rank did not return this rank's object")
        # Every tensor the step and the collectives touched, by name: on the training device or listed here.
        tensors = {f"parameter {n}": t for n, t in core.named_parameters()}
        tensors |= {f"buffer {n}": t for n, t in core.named_buffers()}
        grads = {f"grad {n}": t.grad for n, t in core.named_parameters() if t.grad is not None}
        state = {f"optimizer state {i}.{k}": v for i, st in enumerate(optimizer.state.values())
                 for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        off = _off_device({**tensors, **grads, **state}, device)
        if len(grads) != sum(1 for t in core.parameters() if t.requires_grad):
            problems.append(f"{len(grads)} gradients for {sum(1 for _ in core.parameters())} parameters")
        off += sorted(f"collective tensor on {d}" for d in counter.devices if d != str(device))
        off += sorted(f"DDP gradient bucket on {d}" for d in buckets.devices if d != str(device))
        if off:
            problems.append(f"tensors off the training device {device}: {off[:8]}{' ...' if len(off) > 8 else ''}")
        if buckets.calls == 0:
            problems.append("DDP all-reduced no gradient bucket through the process group")
        if loop_calls == 0:
            problems.append("the loop's collectives did not go through torch.distributed (not forced?)")
        world = dist.world()
    if problems:
        raise AssertionError("; ".join(problems))
    base_name, base, found = ctx.baseline("synthetic_bf16", "the synthetic section")
    ctx.add(
        DDP_RECORD, rate, "img/s", base_name, base, 1, [rate / base, rate / base], amp="bf16", backend=backend,
        world_size=world[1], init_method="tcp://127.0.0.1:<free port>", collectives_forced=forced,
        sync_bn=sync_bn, sync_bn_layers=n_sync if device.type == "cuda" else 0,
        ddp=f"torch.nn.parallel.DistributedDataParallel(model, device_ids={device_ids}) "
            "(as ray.train.torch.prepare_model)",
        compile=f"torch.compile(<the DDP module>, backend={s.compile_backend!r})"
                + ("" if device.type == "cuda" else ": Dynamo's capture without codegen, as the compile section on "
                   "CPU"),
        first_step_s=round(first_step_s, 2), warmup_steps=s.warmup, steps=s.steps,
        ddp_bucket_allreduces=buckets.calls, ddp_bucket_devices=sorted(buckets.devices),
        loop_collectives=list(LOOP_COLLECTIVES), loop_collective_calls=loop_calls,
        collective_calls=counter.calls, collective_devices=sorted(counter.devices),
        devices_checked={"parameters": sum(k.startswith("parameter") for k in tensors),
                         "buffers": sum(k.startswith("buffer") for k in tensors), "grads": len(grads),
                         "optimizer_state": len(state), "training_device": str(device)},
        off_device=[], baseline_found=found, peak_memory_gib=peak_gib(device),
        note="a correctness run with a number attached: bf16 steps of the compiled DDP model (our optimiser, no "
             "GradScaler) against the eager, unwrapped synthetic bound",
    )
    torch._dynamo.reset()  # the compiled graphs of this section are not reused by the others


def _chunks_to_batches(loader: Any, batch: int, device: Any) -> Iterator[tuple[Any, Any, float]]:
    """(images, labels, seconds waited for data) per full batch, assembled on `device` from decoded chunks."""
    import torch

    images = labels = None
    filled = 0
    waited = 0.0
    t_wait = time.perf_counter()
    for chunk in loader:
        waited += time.perf_counter() - t_wait
        x, y = chunk["image"], chunk["label"]
        if images is None:
            images = torch.empty((batch, *x.shape[1:]), dtype=torch.uint8, device=device)
            labels = torch.empty((batch,), dtype=torch.int64, device=device)
        n = min(x.shape[0], batch - filled)
        images[filled : filled + n].copy_(x[:n], non_blocking=True)
        labels[filled : filled + n].copy_(y[:n], non_blocking=True)
        filled += n
        if filled == batch:
            # The next chunk's copy into the same buffer is queued on the same stream, after this step's kernels.
            yield images, labels, waited
            filled, waited = 0, 0.0
        t_wait = time.perf_counter()


def _roi_built() -> bool:
    from pipeline.data import jpeg

    return jpeg.available()


def section_decode(ctx: Ctx) -> None:
    s, data = ctx.sizes, ctx.data()
    workers = decode_workers()
    chunk = fit_chunk(s.chunk, workers, s.crop)  # a power of two, so whole chunks fill each batch
    if s.batch % chunk:
        raise RuntimeError(f"chunk {chunk} does not divide batch {s.batch}")
    ds = DecodeChunks(data.train_files, crop=s.crop, min_scale=s.min_scale, chunk=chunk, limit=s.decode_images)
    if ds.n_images < s.batch:
        raise RuntimeError(f"{ds.n_images} train images < batch {s.batch}")
    loader = decode_loader(ds, workers, ctx.device, persistent=True)
    trainer = SyntheticTrainer(ctx, "bf16")
    waits: list[float] = []

    def decode_pass() -> float:
        n = 0
        sync(ctx.device)
        t0 = time.perf_counter()
        for _ in range(s.decode_passes):
            for chunk in loader:
                chunk["image"].to(ctx.device, non_blocking=True)  # the copy a training step would need
                n += chunk["image"].shape[0]
        sync(ctx.device)
        return n / (time.perf_counter() - t0)

    def train_pass() -> float:
        n, wait = 0, 0.0
        sync(ctx.device)
        t0 = time.perf_counter()
        for _ in range(s.decode_passes):
            for images, labels, waited in _chunks_to_batches(loader, s.batch, ctx.device):
                trainer.step(images, labels)
                n += images.shape[0]
                wait += waited
        sync(ctx.device)
        seconds = time.perf_counter() - t0
        waits.append(wait / seconds)
        return n / seconds

    ctx.log(f"decode pool: {workers} workers x chunks of {chunk}, {ds.n_images} images a pass; warm-up pass")
    synth_images, synth_labels = synthetic_batch(ctx)
    timed_steps(trainer, synth_images, synth_labels, s.warmup)  # cuDNN and the allocator warm before timing
    decode_pass()  # workers start, import torch, read the shards
    train_pass()
    waits.clear()
    rates = alternate({"decode": decode_pass, "train": train_pass}, s.reps)
    loader = None  # the persistent workers exit with the last reference
    dec, dec_spread = median_spread(rates["decode"])
    ctx.results["cpu_decode"] = dec
    shm = shm_free()
    common = {"workers": workers, "chunk": chunk, "images_per_pass": ds.n_images, "passes_per_rep": s.decode_passes,
              "shm_free_mib": None if shm is None else round(shm / 2**20),
              "decode": f"pipeline.data.transforms.train_image (RandomResizedCrop({s.crop}, scale=({s.min_scale}, "
                        "1)) + flip) in a DataLoader process pool (forkserver), pinned memory on a GPU",
              "train_decoder": "ROI decode (pipeline.data.jpeg)" if _roi_built() else "whole-image decode (ROI "
                               "decoder not built: bench/gpu_check.sh builds it where cc + libjpeg headers exist)"}
    base_name, base, found = ctx.baseline("synthetic_bf16", "the synthetic section")
    ctx.add("cpu_decode_pool_vs_synthetic", dec, "img/s", base_name, base, s.reps,
            [dec_spread[0] / base, dec_spread[1] / base], decode_img_s=_rounded(rates["decode"]),
            baseline_found=found, note="decode + host-to-device copy alone: > 1 means the CPUs outrun the GPU bound",
            **common)
    train, train_spread = median_spread(rates["train"])
    ctx.add("train_cpu_decode_vs_synthetic", train, "img/s", base_name, base, s.reps,
            [train_spread[0] / base, train_spread[1] / base], amp="bf16", train_img_s=_rounded(rates["train"]),
            data_wait_frac=round(sorted(waits)[len(waits) // 2], 3) if waits else None, baseline_found=found,
            note="ResNet training fed by the CPU decode pool: how much of the synthetic bound our decode delivers",
            **common)


def gpu_decode_available(device: Any) -> str | None:
    """None when batched nvJPEG decode works here, else why not."""
    if device.type != "cuda":
        return "no GPU"
    try:
        import io

        import numpy as np
        import torch
        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
        data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        out = decode_jpeg([data, data.clone()], device="cuda")
        if not isinstance(out, list) or len(out) != 2 or out[0].device.type != "cuda":
            return f"decode_jpeg(list, device='cuda') returned {type(out).__name__}, not a list of CUDA tensors"
    except Exception as exc:  # noqa: BLE001 (absence is an answer, not a failure)
        return f"torchvision.io.decode_jpeg(list, device='cuda') failed: {type(exc).__name__}: {exc}"
    return None


def section_gpu_decode(ctx: Ctx) -> None:
    why_not = gpu_decode_available(ctx.device)
    if why_not is not None:
        ctx.notes.append(f"gpu_decode: not measured, no record: {why_not}")
        ctx.log(f"not measured: {why_not}")
        return
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data.worker_decode import TrainDraw, WorkerDecoder

    s, data = ctx.sizes, ctx.data()
    raw = [b for f in data.train_files for b in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    jpegs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
    n_batches = len(raw) // s.batch
    # train.decode "worker" as training runs it: TrainDraw's rows (what Ray Data's tasks ship: bytes + the drawn
    # boxes, the same draws as train_image's), decoded by WorkerDecoder on the GPU (batched nvJPEG, crop +
    # resize + flip on the GPU), each batch on a side stream ahead of the consumer.
    draw = TrainDraw(s.min_scale, seed=0)
    rows: list[dict[str, Any]] = []
    for b in range(n_batches):
        part = {"image": np.array(raw[b * s.batch : (b + 1) * s.batch], dtype=object),
                "label": np.zeros(s.batch, np.int64), "key": np.array([f"k{b}_{i}" for i in range(s.batch)])}
        slices = list(draw(part))
        rows.append({k: np.concatenate([x[k] for x in slices]) for k in slices[0]})
    decoder = WorkerDecoder(ctx.device, s.crop)

    def decode_batch(b: int, rng: np.random.Generator) -> None:
        del rng  # the draws were made by TrainDraw, as in training
        decoder.decode(rows[b])

    def gpu_pass() -> float:
        sync(ctx.device)
        t0 = time.perf_counter()
        for _ in range(s.decode_passes):
            for _batch in decoder.batches(iter(rows)):
                pass
        sync(ctx.device)
        return n_batches * s.batch * s.decode_passes / (time.perf_counter() - t0)

    # nvJPEG against libjpeg-turbo on one image: the two IDCTs differ by a level or two, never by a picture.
    ref = decode_jpeg(jpegs[0], mode=ImageReadMode.RGB).float()
    got = decode_jpeg([jpegs[0]], device="cuda", mode=ImageReadMode.RGB)[0].float().cpu()
    diff = float((ref - got).abs().mean())
    if ref.shape != got.shape or diff > 8:
        raise AssertionError(f"GPU decode differs from CPU decode: shapes {tuple(ref.shape)} / {tuple(got.shape)}, "
                             f"mean |diff| {diff:.2f}")
    ctx.log(f"nvJPEG: {n_batches} batches of {s.batch} a pass; warm-up")
    decode_batch(0, np.random.default_rng(1))
    rates = [gpu_pass() for _ in range(s.reps)]
    value, spread = median_spread(rates)
    base_name, base, found = ctx.baseline("cpu_decode", "the decode section")
    ctx.add("gpu_decode_vs_cpu_decode", value, "img/s", base_name, base, s.reps, [spread[0] / base, spread[1] / base],
            gpu_decode_img_s=_rounded(rates), mean_abs_diff_vs_cpu=round(diff, 3), cpu_workers=decode_workers(),
            baseline_found=found,
            setup="train.decode 'worker': pipeline.data.worker_decode.WorkerDecoder.batches over TrainDraw's rows "
                  "(JPEG bytes + drawn boxes): torchvision.io.decode_jpeg(list of a batch, device='cuda') (batched "
                  "nvJPEG) on a side stream, then per image crop + antialiased resize + flip on the GPU, into one "
                  "uint8 batch; the baseline is the CPU decode pool (train_image, ROI decoding) alone")


def section_eval(ctx: Ctx) -> None:
    """The evaluation core shared by the loop's validation and the evaluate stage (`eval_logits`: normalise +
    autocast forward; `topk_counts`: top-1/top-5 counts on the device, label -1 = padding) over the val shards:
    on batches already on the device (the core's bound) and end to end from an InMemoryValShard (decoded in
    this process, as run_loop validates in-process)."""
    import pyarrow.parquet as pq
    import torch

    from pipeline.metrics import eval_logits, topk_correct, topk_counts
    from pipeline.models import build_model
    from pipeline.training.local import InMemoryValShard

    s, data = ctx.sizes, ctx.data()
    torch.manual_seed(0)
    model = build_model(s.arch, num_classes=data.num_classes).to(device=ctx.device, memory_format=torch.channels_last)
    model.eval()
    amp_dtype = torch.bfloat16
    val = InMemoryValShard(data.val_files, resize=s.val_resize, crop=s.crop)

    def batches() -> Iterator[dict[str, Any]]:
        return val.iter_torch_batches(batch_size=s.eval_batch, device=ctx.device)

    def count(source: Any) -> tuple[list[int], Any, Any]:
        """[top-1, top-5, images] summed on the device as the loop does, and the last batch's logits/labels."""
        counts = torch.zeros(3, dtype=torch.int64, device=ctx.device)
        logits = y = None
        for batch in source:
            y = batch["label"]
            logits = eval_logits(model, batch["image"], channels_last=True, amp_dtype=amp_dtype)
            counts[:2] += topk_counts(logits, y, (1, 5))
            counts[2] += (y >= 0).sum()
        return [int(v) for v in counts.tolist()], logits, y

    ctx.log(f"{data.n_val} val images, batches of {s.eval_batch}: decoding once into device memory")
    resident = list(batches())  # also the end-to-end path's warm-up
    # The record names its batch: each shard's rows in batches of eval_batch (the last one of a shard shorter),
    # as the loop's validation asks for them; a decode that hands out its own slices instead is caught here.
    batch_rows = [int(b["label"].shape[0]) for b in resident]
    expected_rows = [min(s.eval_batch, n - start) for f in data.val_files
                     for n in [pq.read_metadata(f).num_rows] for start in range(0, n, s.eval_batch)]
    results: dict[str, Any] = {}

    def timed(name: str, source: Callable[[], Any]) -> float:
        sync(ctx.device)
        t0 = time.perf_counter()
        results[name] = count(source())
        sync(ctx.device)
        return results[name][0][2] / (time.perf_counter() - t0)

    timed("core", lambda: resident)  # warm-up (cuDNN algorithms for the eval shapes)
    rates = alternate({"core": functools.partial(timed, "core", lambda: resident),
                       "val_shard": functools.partial(timed, "val_shard", batches)}, s.reps)
    (c1, c5, n), logits, y = results["core"]
    e2e_counts = results["val_shard"][0]
    problems = []
    if n != data.n_val:
        problems.append(f"the core counted {n} val images, the manifest has {data.n_val}")
    if not 0 <= c1 <= c5 <= n:
        problems.append(f"top-1 {c1} <= top-5 {c5} <= n {n} does not hold")
    on_cpu = topk_correct(logits.cpu(), y.cpu(), (1, 5))
    on_dev = topk_correct(logits, y, (1, 5))
    if on_cpu != on_dev:
        problems.append(f"topk_correct of the same logits: {on_dev} on {ctx.device}, {on_cpu} on the CPU")
    if batch_rows != expected_rows:
        problems.append(f"eval batches of {batch_rows} rows; batch {s.eval_batch} over shards of "
                        f"{[pq.read_metadata(f).num_rows for f in data.val_files]} rows gives {expected_rows}")
    if e2e_counts[2] != data.n_val:
        problems.append(f"the InMemoryValShard pass counted {e2e_counts[2]} val images, the manifest has {data.n_val}")
    if problems:
        raise AssertionError("; ".join(problems))
    core_rate, _ = median_spread(rates["core"])
    e2e_rate, _ = median_spread(rates["val_shard"])
    ratios = paired_ratios(rates["val_shard"], rates["core"])
    ctx.add(
        "eval_val_shard_vs_core", e2e_rate, "img/s", "eval_core_resident", core_rate, s.reps,
        [min(ratios), max(ratios)], amp="bf16", eval_batch=s.eval_batch, batch_rows=batch_rows, n_val=n,
        top1_correct=c1,
        top5_correct=c5, val_shard_counts=e2e_counts, counts_agree=e2e_counts == [c1, c5, n],
        core_img_s=_rounded(rates["core"]), val_shard_img_s=_rounded(rates["val_shard"]),
        model=f"{s.arch}, random init (the counts check plumbing, not accuracy)",
        core="pipeline.metrics.eval_logits + topk_counts summed on the device (the loop's _validate), over "
             "decoded val batches already on the device",
        value_is="the same core fed by pipeline.training.local.InMemoryValShard (ValDecode in this process)",
    )


def section_compile(ctx: Ctx) -> None:
    import torch

    s = ctx.sizes
    images, labels = synthetic_batch(ctx)
    estimate = s.compile_estimate_s
    for amp in s.compile_amps:
        name = f"train_compiled_vs_eager_{amp}"
        with ctx.item(name):
            if not ctx.can_start(estimate):
                raise SectionSkipped(f"time budget: {ctx.elapsed():.0f} s spent, ~{estimate:.0f} s more needed "
                                     f"(budget {ctx.args.budget_s:g} s, hard limit {ctx.args.hard_limit_s:g} s)")
            t_item = time.perf_counter()
            eager = SyntheticTrainer(ctx, amp)
            compiled = SyntheticTrainer(ctx, amp, compile_backend=s.compile_backend)
            ctx.log(f"{amp}: compiling ({s.compile_backend}) on the first step")
            sync(ctx.device)
            t0 = time.perf_counter()
            compiled.step(images, labels)
            sync(ctx.device)
            compile_s = time.perf_counter() - t0
            ctx.log(f"{amp}: first compiled step took {compile_s:.1f} s; warm-up")
            timed_steps(compiled, images, labels, s.warmup)
            timed_steps(eager, images, labels, s.warmup)
            pair = {"compiled": compiled, "eager": eager}
            rates = alternate(
                {k: functools.partial(timed_steps, tr, images, labels, s.steps) for k, tr in pair.items()}, s.reps
            )
            value, vspread = median_spread(rates["compiled"])
            base, bspread = median_spread(rates["eager"])
            ratios = paired_ratios(rates["compiled"], rates["eager"])
            ctx.add(name, value, "img/s", f"train_eager_{amp}", base, s.reps, [min(ratios), max(ratios)], amp=amp,
                    compile_backend=s.compile_backend, first_step_s=round(compile_s, 1),
                    compiled_img_s=_rounded(rates["compiled"]), eager_img_s=_rounded(rates["eager"]),
                    nonfinite_losses={"compiled": compiled.nonfinite, "eager": eager.nonfinite},
                    peak_memory_gib=peak_gib(ctx.device), warmup_steps=s.warmup, steps=s.steps)
            estimate = time.perf_counter() - t_item  # the next amp compiles about as long as this one
            del eager, compiled, pair
        torch._dynamo.reset()
        release_gpu()


SECTION_FNS: dict[str, Callable[[Ctx], None]] = {
    "synthetic": section_synthetic,
    "train_loop": section_train_loop,
    "ddp": section_ddp,
    "decode": section_decode,
    "gpu_decode": section_gpu_decode,
    "eval": section_eval,
    "compile": section_compile,
}


# ------------------------------------------------------------------------------------------------ summary


def summary(ctx: Ctx) -> str:
    rows = [("name", "status", "value", "baseline", "ratio [min, max]", "n")]
    for r in ctx.records:
        if r["status"] == "ok":
            rows.append((r["name"], "ok", f"{r['value']:g} {r['unit']}",
                         f"{r['baseline_value']:g} ({r['baseline_name']})",
                         f"{r['ratio']:.3f} [{r['spread'][0]:.3f}, {r['spread'][1]:.3f}]", str(r["n_runs"])))
        else:
            rows.append((r["name"], r["status"].upper(), "-", "-", "-", "0"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = []
    if ctx.on_gpu:
        head.append(f"GPU: {ctx.gpu}, NVIDIA driver {ctx.driver or 'unknown'} (every record's `machine` says so)")
    else:
        head.append("NO GPU: this was the CPU plumbing check; nothing was measured on a GPU. The numbers below come "
                    f"from tiny CPU runs ({ctx.sizes.arch} at {ctx.sizes.crop} px) and say nothing about GPU speed.")
    tail = [f"  {r['name']}: {r['status'].upper()}: {r['error']}" for r in ctx.records if r["status"] != "ok"]
    tail += [f"  note: {n}" for n in ctx.notes]
    if ctx.guard.refused:
        tail.append(f"  refused imports (absent on the GPU machine): {sorted(set(ctx.guard.refused))}")
    return "\n".join(["", *head, "", *lines, *([""] + tail if tail else [])])


def exit_code(ctx: Ctx) -> int:
    statuses = {r["status"] for r in ctx.records}
    if "error" in statuses or forbidden_loaded():
        return EXIT_FAILED
    if "skipped" in statuses:
        return EXIT_SKIPPED
    return EXIT_OK


def _watchdog(ctx: Ctx) -> threading.Timer:
    """At the hard limit: record the section that is still running as an error, write, print, exit 1 (a hung
    collective or compile must not eat the machine's whole lease)."""

    def fire() -> None:
        if ctx.finished:
            return
        print(f"\n[gpu-check] HARD LIMIT {ctx.args.hard_limit_s:g} s reached in section {ctx.current!r}; "
              "stacks follow", flush=True)
        faulthandler.dump_traceback(all_threads=True)
        ctx.add_problem(f"gpu_check_{ctx.current}", "error", f"still running at the hard limit of "
                        f"{ctx.args.hard_limit_s:g} s (stopped; see the stacks in the log)")
        ctx.write()
        print(summary(ctx), flush=True)
        os._exit(EXIT_FAILED)

    timer = threading.Timer(max(ctx.args.hard_limit_s - ctx.elapsed(), 0.0), fire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, steps and repetitions; bf16 compile only")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON report, rewritten (default {DEFAULT_OUT})")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, run in this order: {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--cpu", action="store_true", help="the CPU plumbing check even where a GPU is visible")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"no section starts after this many seconds (default {GPU_BUDGET[0]:g} on a GPU, "
                             f"{CPU_BUDGET[0]:g} for the CPU check)")
    parser.add_argument("--hard-limit-s", type=float, default=None,
                        help=f"then stop whatever runs, write the records, exit 1 (default {GPU_BUDGET[1]:g} on a "
                             f"GPU, {CPU_BUDGET[1]:g} for the CPU check)")
    args = parser.parse_args(argv)
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SECTIONS]
    if unknown or not wanted:
        parser.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    args.sections = [x for x in SECTIONS if x in wanted]
    if None not in (args.budget_s, args.hard_limit_s) and args.hard_limit_s <= args.budget_s:
        parser.error("--hard-limit-s must be larger than --budget-s")
    return args


def resolve_budget(args: argparse.Namespace, on_gpu: bool) -> None:
    """Defaults by mode: the GPU check must fit its machine's lease (under 6 minutes with start-up); the CPU
    check only guards against a hang, on CI machines that other jobs may slow down several-fold."""
    budget, hard = GPU_BUDGET if on_gpu else CPU_BUDGET
    if args.budget_s is None:
        args.budget_s = budget if args.hard_limit_s is None else min(budget, args.hard_limit_s * 0.85)
    if args.hard_limit_s is None:
        args.hard_limit_s = max(hard, args.budget_s + 45)


# What the check imports beyond the standard library (bench/gpu_check.sh checks the same before it starts):
# the GPU machine's own torch, torchvision, numpy, Pillow, pyarrow and PyYAML, and the carried wheels' pydantic
# and tqdm. pyarrow reads and writes every shard; without it only the synthetic, ddp and compile sections run.
DEPENDENCIES = ("torch", "torchvision", "numpy", "PIL", "pyarrow", "pyarrow.parquet", "yaml", "pydantic", "tqdm")
START = "start"  # the name under which a failure before the first section is recorded (and INJECT_ENV's value)


def missing_dependencies(names: tuple[str, ...] = DEPENDENCIES) -> dict[str, str]:
    """{module: why it does not import} for each of `names` that does not."""
    import importlib

    missing = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 (a broken install is as missing as an absent one)
            missing[name] = f"{type(exc).__name__}: {exc}"
    return missing


def write_start_failure(out: str, exc: BaseException, load_before: float) -> None:
    """The report of a run that failed before its first section (no torch, no GPU facts, ...): one error record
    in the usual shape, stdlib only, so that even then there is a report to read."""
    import json

    try:
        where = machine(load_before)
    except Exception as inner:  # noqa: BLE001 (the report matters more than its machine line)
        where = f"unknown ({type(inner).__name__}: {inner})"
    rec: dict[str, Any] = {k: None for k in RECORD_KEYS}
    rec.update(name=f"gpu_check_{START}", machine=where, n_runs=0, section=START, status="error",
               error=f"{type(exc).__name__}: {exc}", traceback=_tail("".join(traceback.format_exception(exc))),
               gpu=None, gpu_driver=None, measured_on_gpu=False, mode="unknown (failed before the first section)")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([rec], indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = load1()
    print(f"[gpu-check] starting: sections {','.join(args.sections)}{' (quick)' if args.quick else ''}; "
          f"report {args.out}", flush=True)
    try:
        guard = install_import_guard()
        if os.environ.get(INJECT_ENV) == START:
            raise RuntimeError(f"failure injected by {INJECT_ENV}={START} (test hook)")
        missing = missing_dependencies()
        import torch

        device, gpu, driver, suffix = gpu_facts(args.cpu)
    except Exception as exc:  # noqa: BLE001 (recorded: a report is written whatever fails)
        traceback.print_exc()
        write_start_failure(args.out, exc, load_before)
        print(f"\n[gpu-check] FAILED before the first section: {type(exc).__name__}: {exc}; the error is in "
              f"{args.out}; exit {EXIT_FAILED}", flush=True)
        return EXIT_FAILED
    resolve_budget(args, gpu is not None)
    if gpu is not None:
        # run_loop turns cuDNN's autotuner on for CUDA (fixed input sizes), for the whole process: every section
        # runs with it, so the bounds and the loop are measured alike.
        torch.backends.cudnn.benchmark = True
    else:
        # One intra-op thread: on a 2-core CI machine that other jobs keep busy, two spinning OpenMP threads made
        # the CPU check's tiny steps 20x slower (0.77 vs 16.6 img/s, same minute, load 9); idle, 1 thread costs
        # little at these sizes.
        torch.set_num_threads(1)
    sizes = (GPU_QUICK if args.quick else GPU_SIZES) if gpu else CPU_SIZES
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Ctx(args=args, sizes=sizes, device=device, gpu=gpu, driver=driver, machine_suffix=suffix, guard=guard,
                  tmp=Path(tmp), t0=t_start)
        ctx.log(f"torch {torch.__version__}, {cores()} cores{suffix}")
        if missing:  # recorded first; the sections that need a missing module fail on their own, recorded too
            ctx.current = "dependencies"
            ctx.log(f"MISSING: {missing}")
            ctx.add_problem("gpu_check_dependencies", "error", "cannot import " + "; ".join(
                f"{name} ({why})" for name, why in missing.items()), missing=sorted(missing),
                checked=list(DEPENDENCIES))
            ctx.write()
        timer = _watchdog(ctx)
        try:
            for name in args.sections:
                ctx.current = name
                if not ctx.can_start():
                    ctx.log(f"SKIPPED: {ctx.elapsed():.0f} s spent of the {args.budget_s:g} s budget")
                    ctx.add_problem(f"gpu_check_{name}", "skipped", f"time budget: {ctx.elapsed():.0f} s spent of "
                                    f"{args.budget_s:g} s before it could start")
                    continue
                t0 = time.perf_counter()
                ctx.log("starting")
                try:
                    if os.environ.get(INJECT_ENV) == name:
                        raise RuntimeError(f"failure injected by {INJECT_ENV}={name} (test hook)")
                    while os.environ.get(HANG_ENV) == name:
                        time.sleep(1.0)
                    SECTION_FNS[name](ctx)
                except Exception as exc:  # noqa: BLE001 (recorded; the exit code says so)
                    traceback.print_exc()
                    ctx.add_problem(f"gpu_check_{name}", "error", f"{type(exc).__name__}: {exc}",
                                    traceback=_tail(traceback.format_exc()))
                    ctx.log(f"FAILED after {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {exc}")
                else:
                    ctx.log(f"done in {time.perf_counter() - t0:.1f} s")
                finally:
                    release_gpu()
                ctx.write()
        finally:
            ctx.finished = True
            timer.cancel()
            ctx.write()  # also when a section ends with a BaseException (KeyboardInterrupt, SystemExit)
        ctx.current = "end"
        leaked = forbidden_loaded()
        if leaked:
            ctx.notes.append(f"forbidden modules loaded despite the guard: {leaked[:5]}")
        ctx.write()
        print(summary(ctx), flush=True)
        code = exit_code(ctx)
        print(f"\n[gpu-check] {len(ctx.records)} record(s) in {args.out} after {ctx.elapsed():.0f} s; exit {code}"
              + ("" if ctx.on_gpu else " (CPU plumbing check: nothing was measured on a GPU)"), flush=True)
        return code


if __name__ == "__main__":
    # Run through the importable module, not __main__: the decode pool's forkserver workers unpickle
    # DecodeChunks as bench.gpu_check.DecodeChunks.
    from bench import gpu_check

    sys.exit(gpu_check.main())
