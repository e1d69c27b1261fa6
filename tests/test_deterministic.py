"""train.deterministic: two runs of 2 epochs on CPU through real Ray Train and Ray Data end with identical weights
(max abs difference 0), with the recipe's random augmentations on; without the key, the same two runs differ (so
the comparison can fail)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.training.trainer import init_ray

    init_ray()
    yield
    ray.shutdown()


def final_weights(shards: Path, storage: Path, name: str, deterministic: bool) -> dict[str, torch.Tensor]:
    from pipeline.training.trainer import build_trainer, make_job, run

    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={shards}", f"train.storage_path={storage}", "train.epochs=2", "train.batch_size=16",
        "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.lr=0.05", "train.auto_augment=ta_wide",
        "train.random_erase=0.5", "train.mixup_alpha=0.2", f"train.deterministic={str(deterministic).lower()}",
    ])
    job = make_job(p, "resnet18", p.train.lr, 0, p.train.epochs, None)
    # One Ray Train worker process (the embedded default's shape): Train re-applies its own ingest options to the
    # datasets there, which once dropped the train dataset's preserve_order (an in-process run did not show it).
    outcome = run(build_trainer(job, p, name=name, num_workers=1, storage_path=str(storage)))
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    return {k: v for k, v in outcome.state["model"].items() if torch.is_floating_point(v)}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_deterministic_runs_end_with_identical_weights(ray_local, synthetic_shards: Path, tmp_path: Path) -> None:
    first = final_weights(synthetic_shards, tmp_path / "a", "det-a", deterministic=True)
    second = final_weights(synthetic_shards, tmp_path / "b", "det-b", deterministic=True)
    assert max_abs_diff(first, second) == 0.0
    # The control: the same recipe without the key draws its augmentation from OS entropy.
    loose = final_weights(synthetic_shards, tmp_path / "c", "loose-c", deterministic=False)
    assert max_abs_diff(first, loose) > 0.0
