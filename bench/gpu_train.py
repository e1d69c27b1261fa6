"""GPU training throughput of ResNet-50 (bf16 autocast, channels_last, SGD, batch 256, 224 px), two ways:

(a) `rn50_synthetic_on_gpu`: uint8 images already on the GPU, normalised on the GPU as our loop does, no input
    pipeline at all: the compute bound of this GPU for our model and recipe. torch.cuda.synchronize() brackets
    the timed steps; warm-up steps (cuDNN autotuning, allocator, compile) are excluded. `--compile` adds a
    torch.compile'd run of the same.
(b) `rn50_shard_pipeline`: the product end to end on one GPU: a few thousand ImageNet-size photo-like JPEGs
    (500x375, q90; bench.bench_ingest) -> `prepare_shards` (the ImageNet preset's max_side) -> Ray Data ingest ->
    one Ray Train worker holding the GPU (`build_trainer` with train.use_gpu=true, NCCL-free single worker), the
    preset's recipe with batch 256. Throughput is the loop's per-epoch `images_per_s` (train steps, data waits
    included, validation excluded) after epoch 1.

Then the record `gpu_pipeline_vs_synthetic_rn50` = (b) / (a): how much of the GPU our pipeline delivers.
Each measurement prints one JSON line carrying the GPU's name. Without a GPU the script says so and exits 0.

    python -m bench.gpu_train [--images 4000] [--epochs 4] [--steps 30] [--reps 3] [--compile]
                              [--skip-pipeline] [--report reports/bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import load1, machine, median_spread, record, write_report

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "imagenet-resnet50.yaml"
ARCH = "resnet50"
BATCH = 256
SIZE = 224
LR = 0.1  # the paper's lr for batch 256


def gpu_name() -> str | None:
    """The first visible CUDA device's name, or None when there is none."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------- (a) synthetic


def synthetic_throughput(
    *, warmup: int, steps: int, reps: int, compile_model: bool = False, num_classes: int = 1000
) -> list[float]:
    """images/s of `reps` timed runs of `steps` training steps on tensors resident on the GPU."""
    import torch
    from torch import nn

    from pipeline.data.transforms import normalize
    from pipeline.models import build_model

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(ARCH, num_classes=num_classes).to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    fwd = torch.compile(model) if compile_model else model
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, device=device)  # (N, 3, H, W)
    labels = torch.randint(0, num_classes, (BATCH,), device=device)

    def step() -> None:
        x = normalize(images, channels_last=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(fwd(x).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()  # the GPU has finished every queued kernel before the clock stops
        rates.append(BATCH * steps / (time.perf_counter() - t0))
    return rates  # the model and tensors die with this frame; main() then empties the CUDA cache


# -------------------------------------------------------------------------------------- (b) pipeline


def pipeline_throughput(
    tmpdir: Path, *, n_images: int, epochs: int, compile_model: bool = False
) -> dict[str, Any]:
    """Our product on one GPU worker: JPEGs -> shards -> Ray Data -> TorchTrainer. Per-epoch history."""
    from bench.bench_ingest import WNIDS, make_imagenet_tree
    from pipeline.config import load_params, with_absolute_paths
    from pipeline.data.prepare import prepare_shards
    from pipeline.runtime import init_ray
    from pipeline.training.trainer import build_trainer, make_job, run

    cores = os.cpu_count() or 1
    raw, shards = tmpdir / "raw", tmpdir / "shards"
    per_class = max(1, n_images // len(WNIDS))
    t0 = time.perf_counter()
    make_imagenet_tree(raw, per_class, val_per_class=4, processes=cores)
    preset = load_params(PRESET)
    prepare_shards(
        raw, shards, source="folders", max_side=preset.data.max_side, jpeg_quality=preset.data.jpeg_quality,
        rows_per_shard=256, workers=cores, max_rejected=0, progress=False,
    )
    t_data = time.perf_counter() - t0
    # The worker needs a couple of threads for the optimizer and Python; every other CPU decodes.
    worker_cpus = 2
    overrides = [
        f"data.shards_dir={shards}",
        f"train.storage_path={tmpdir / 'ray_results'}",
        f"train.epochs={epochs}",
        f"train.batch_size={BATCH}",
        f"train.lr={LR}",
        "train.lr_warmup_epochs=0",
        "train.num_workers=1",
        f"train.cpus_per_worker={worker_cpus}",
        "train.use_gpu=true",
        f"train.compile={'true' if compile_model else 'false'}",
        "train.use_tuned=false",
    ]
    p = with_absolute_paths(load_params(PRESET, overrides), ROOT)
    t0 = time.perf_counter()
    init_ray()
    job = make_job(p, ARCH, p.train.lr, p.train.lr_warmup_epochs, p.train.epochs, None)
    trainer = build_trainer(
        job, p, name=f"bench-gpu-{time.time_ns()}", num_workers=1, storage_path=p.train.storage_path
    )
    outcome = run(trainer)
    wall = time.perf_counter() - t0
    history = outcome.history
    return {
        "images_per_s": [h["images_per_s"] for h in history],
        "data_wait_frac": [h["data_wait_s"] / max(h["epoch_time_s"] - h["val_time_s"], 1e-9) for h in history],
        "n_train": job.n_train,
        "wall_s": wall,
        "data_prep_s": t_data,
        "worker_cpus": worker_cpus,
        "max_side": p.data.max_side,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="train JPEGs to generate for (b)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of (b); the first is excluded")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps of (a)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per repetition of (a)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of (a)")
    parser.add_argument("--compile", action="store_true", help="also measure (a) with torch.compile")
    parser.add_argument("--skip-pipeline", action="store_true", help="measure (a) only")
    parser.add_argument("--report", default=None, help="merge the (b)/(a) record into this JSON report")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is excluded)")

    name = gpu_name()
    if name is None:
        print("bench.gpu_train: no CUDA GPU visible (torch.cuda.is_available() is False); nothing measured. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 0
    import torch

    load_before = load1()
    common = {"gpu": name, "arch": ARCH, "batch": BATCH, "size": SIZE, "amp": "bf16", "channels_last": True,
              "torch": torch.__version__, "cuda": torch.version.cuda}
    synth = synthetic_throughput(warmup=args.warmup, steps=args.steps, reps=args.reps)
    torch.cuda.empty_cache()  # leave the GPU's memory to the Ray worker of (b)
    synth_median, synth_spread = median_spread(synth)
    emit({"measurement": "rn50_synthetic_on_gpu", "images_per_s": round(synth_median, 1),
          "spread": [round(v, 1) for v in synth_spread], "n_runs": args.reps, "steps": args.steps,
          "warmup_steps": args.warmup, "compile": False, "machine": machine(load_before), **common})
    if args.compile:
        compiled = synthetic_throughput(warmup=args.warmup, steps=args.steps, reps=args.reps, compile_model=True)
        torch.cuda.empty_cache()
        c_median, c_spread = median_spread(compiled)
        emit({"measurement": "rn50_synthetic_on_gpu_compiled", "images_per_s": round(c_median, 1),
              "spread": [round(v, 1) for v in c_spread], "n_runs": args.reps, "steps": args.steps,
              "warmup_steps": args.warmup, "compile": True, **common})
    if args.skip_pipeline:
        return 0

    import ray

    started_ray = not ray.is_initialized()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
            pipe = pipeline_throughput(Path(tmp), n_images=args.images, epochs=args.epochs)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    steady = pipe["images_per_s"][1:]
    value, value_spread = median_spread(steady)
    emit({"measurement": "rn50_shard_pipeline", "images_per_s": round(value, 1),
          "spread": [round(v, 1) for v in value_spread], "n_runs": len(steady),
          "per_epoch_images_per_s": [round(v, 1) for v in pipe["images_per_s"]],
          "data_wait_frac": [round(v, 3) for v in pipe["data_wait_frac"]],
          "n_train": pipe["n_train"], "wall_s_incl_startup": round(pipe["wall_s"], 1),
          "data_prep_s": round(pipe["data_prep_s"], 1), "worker_cpus": pipe["worker_cpus"],
          "max_side": pipe["max_side"], "machine": machine(load_before), **common})
    rec = record(
        "gpu_pipeline_vs_synthetic_rn50", value, "img/s", "rn50_synthetic_on_gpu", synth_median, len(steady),
        # Epochs of (b) are not paired with repetitions of (a): the spread is each timed epoch over (a)'s median.
        [min(steady) / synth_median, max(steady) / synth_median], load_before=load_before,
        gpu=name, data_wait_frac=round(statistics.median(pipe["data_wait_frac"][1:]), 3),
        setup=(f"{ARCH} bf16 autocast, channels_last, SGD, batch {BATCH}, {SIZE} px; (b): 1 Ray Train worker x "
               f"{pipe['worker_cpus']} CPUs + GPU, {pipe['n_train']} train JPEGs, max_side {pipe['max_side']}"),
    )
    emit(rec)
    if args.report:
        write_report([rec], args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
