"""Two Ray Train workers with the same global batch end with the same weights as one worker.

The loop itself (pipeline.training.loop.run_loop) runs on real Ray Train workers with a real gloo process group;
only the source of batches is replaced by a deterministic one, because Ray Data decides at run time which rows
go to which rank (that split is tested elsewhere: disjoint rows, exact counts).

BatchNorm on CPU normalises with each rank's own half-batch statistics (SyncBatchNorm needs a GPU), so a global
batch of 2 different halves legitimately trains differently on 1 and 2 workers. Each global batch is therefore
two copies of one half-batch: the 1-worker run sees [h, h], each of the 2 ranks sees h. Everything else must then
agree exactly: the per-worker batch (global / world size), steps per epoch, the LR schedule, DDP's initial weight
broadcast (ranks are seeded differently), gradient averaging (not summing), clipping, momentum, weight decay.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 16
STEPS = 4
CROP = 32


def half_batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (GLOBAL_BATCH // 2, 3, CROP, CROP), dtype=np.uint8),
         "label": rng.integers(0, 4, GLOBAL_BATCH // 2).astype(np.int64)}
        for _ in range(STEPS)
    ]


class DuplicatedHalves:
    """Stands in for the Ray Data shard: global batch k is half-batch k twice; `batch_size` (the per-worker
    batch the loop asks for) decides how much of it one rank gets."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def iter_torch_batches(self, *, batch_size: int, device: Any = None, **_: Any):
        if batch_size * self.world_size != GLOBAL_BATCH:
            raise AssertionError(f"per-worker batch {batch_size} x {self.world_size} != global {GLOBAL_BATCH}")
        for half in half_batches():
            glob = {k: np.concatenate([v, v]) for k, v in half.items()}
            # Rank r's slice of the global batch: with 2 ranks, each slice is exactly one copy of the half.
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            part = {k: torch.from_numpy(v[rank * batch_size:(rank + 1) * batch_size]) for k, v in glob.items()}
            yield {k: t.to(device) for k, t in part.items()}


def worker_fn(config: dict[str, Any]) -> None:
    import ray.train

    from pipeline.training.loop import Job, TrainSession, run_loop

    session = TrainSession()
    world = ray.train.get_context().get_world_size()
    session.train_shard = lambda: DuplicatedHalves(world)  # type: ignore[method-assign]
    run_loop(Job(**config), session)


def _train(p, job, name: str, workers: int, storage: Path) -> dict[str, torch.Tensor]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        worker_fn, train_loop_config=job.to_config(),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    from pipeline.training.checkpoint import load_train_state

    with result.checkpoint.as_directory() as d:
        state = load_train_state(d)
    assert state["epoch"] == 1
    return {k.removeprefix("module."): v for k, v in state["model"].items()}


@pytest.mark.ray
def test_two_workers_same_global_batch_same_weights_as_one(synthetic_shards: Path, tmp_path: Path) -> None:
    import ray

    from pipeline.runtime import init_ray
    from pipeline.training.trainer import make_job

    sets = [f"data.shards_dir={synthetic_shards}", f"train.storage_path={tmp_path}", "train.epochs=1",
            f"train.batch_size={GLOBAL_BATCH}", "train.lr_warmup_epochs=0", "train.use_tuned=false",
            "train.lr=0.2", "train.amp=none", "train.weight_decay=1e-3", "train.clip_grad_norm=1.0",
            "train.model_ema_decay=0.0", "train.mixup_alpha=0", "train.cutmix_alpha=0", "train.cpus_per_worker=1"]
    p = load_params(ROOT / "params.yaml", sets)
    job = make_job(p, "resnet18", p.train.lr, 0, 1, None)
    job.n_train = GLOBAL_BATCH * STEPS  # the loop derives steps per epoch from it
    init_ray()
    try:
        one = _train(p, job, "one", 1, tmp_path)
        two = _train(p, job, "two", 2, tmp_path)
    finally:
        ray.shutdown()
    assert one.keys() == two.keys()
    from pipeline.training.loop import _build_model

    torch.manual_seed(p.seed)  # what rank 0 (and the 1-worker run) starts from
    start = _build_model(job, p).state_dict()
    moved = max(float((one[k].float() - start[k].float()).abs().max()) for k in one if k.endswith("conv.weight")
                or k.endswith("conv1.weight"))
    assert moved > 1e-3, "the weights must have changed for the comparison to mean anything"
    # Every weight, and the BN running means. Not the running variances: BN tracks the unbiased variance,
    # n/(n-1) of the batch's, and n is 16 for [h, h] but 8 for h (the normalisation itself uses the biased one).
    compared = [k for k in one if not k.endswith(("running_var", "num_batches_tracked"))]
    assert len(compared) > 60  # resnet18: 62 weights and biases, 20 running means
    diffs = {k: float((one[k].float() - two[k].float()).abs().max()) for k in compared}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= 1e-4, f"max |w1 - w2| = {diffs[worst]:.3g} at {worst}; " + str(
        sorted(diffs.items(), key=lambda kv: -kv[1])[:8])
