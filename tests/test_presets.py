"""The presets in configs/: each validates against the schema and names every train key explicitly; the paper's
preset is one DAG over all five depths; a tiny-data version of each (the same keys, small sizes) trains end to end
on real Ray Train and Ray Data."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, TrainParams, load_params

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DVC = Path(shutil.which("dvc") or ROOT / ".venv" / "bin" / "dvc")


def test_there_are_the_three_recipes() -> None:
    names = {p.stem for p in PRESETS}
    assert {"imagenet-paper", "imagenet-torchvision", "imagenet-fast"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_names_every_train_key(preset: Path) -> None:
    p = load_params(preset)
    tree = yaml.safe_load(preset.read_text())
    # A preset is a whole recipe: no train key silently falls back to the schema's default.
    missing = sorted(set(TrainParams.model_fields) - set(tree["train"]))
    assert not missing, f"{preset.name}: train keys not set: {missing}"
    # DVC keys train@ARCH on train.epochs_by_arch.ARCH: every arch needs its entry.
    assert set(p.train.epochs_by_arch) >= set(p.model.archs)


def test_recipes_carry_their_papers_keys() -> None:
    paper = load_params(ROOT / "configs" / "imagenet-paper.yaml")
    assert paper.model.archs == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert (paper.train.lr * 256 / paper.train.batch_size, paper.train.lr_scheduler, paper.train.weight_decay) == (
        0.1, "step", 1e-4)
    tv = load_params(ROOT / "configs" / "imagenet-torchvision.yaml").train
    assert (tv.auto_augment, tv.random_erase, tv.ra_sampler, tv.ra_reps, tv.label_smoothing) == ("ta_wide", 0.1,
                                                                                                True, 4, 0.1)
    assert (tv.mixup_alpha, tv.cutmix_alpha, tv.epochs, tv.lr_scheduler) == (0.2, 1.0, 600, "cosine")
    assert (tv.train_crop_size, tv.val_resize_size, tv.val_crop_size) == (176, 232, 224) and tv.model_ema_decay > 0
    fast = load_params(ROOT / "configs" / "imagenet-fast.yaml").train
    assert fast.prog_resize_min_size is not None and fast.prog_resize_min_size < fast.train_crop_size
    assert fast.val_crop_size > fast.train_crop_size  # test-time resolution increase


@pytest.mark.subprocess
def test_paper_preset_is_one_dag_over_five_depths(tmp_path: Path) -> None:
    """dvc.yaml's foreach over model.archs gives the paper's preset a train and an evaluate stage per depth."""
    from tests.conftest import copy_repo

    repo = copy_repo(tmp_path / "repo")
    shutil.copy(ROOT / "configs" / "imagenet-paper.yaml", repo / "params.yaml")
    subprocess.run([str(DVC), "config", "--local", "core.no_scm", "true"], cwd=repo, check=True)  # no .git in the copy
    out = subprocess.run([str(DVC), "stage", "list", "--name-only"], cwd=repo, check=True, capture_output=True,
                         text=True).stdout.split()
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        assert f"train@{arch}" in out and f"evaluate@{arch}" in out, out


# --- tiny-data runs ---------------------------------------------------------------------------------------------


def _small(size: int) -> int:
    """A preset's pixel size at 1/7 (224 -> 32), on a multiple of 4: ratios between sizes survive."""
    return max(8, int(round(size * 32 / 224 / 4)) * 4)


def tiny(preset: Path, shards: Path, storage: Path) -> Params:
    """The preset with the same keys at tiny sizes: its first arch, 2 epochs of the 64-image synthetic set,
    pixel sizes / 7, one in-process worker on CPU, fp32."""
    tree: dict[str, Any] = yaml.safe_load(preset.read_text())
    arch = tree["model"]["archs"][0]
    tree["model"]["archs"] = [arch]
    tree["data"]["shards_dir"] = str(shards)
    t = tree["train"]
    t.update(epochs=2, epochs_by_arch={arch: None}, batch_size=16, lr=min(t["lr"], 0.1),
             lr_warmup_epochs=min(t["lr_warmup_epochs"], 1), num_workers=0, cpus_per_worker=2, use_gpu=False,
             amp="off", storage_path=str(storage), use_tuned=False, pretrained=None, compile=False)
    for key in ("train_crop_size", "val_resize_size", "val_crop_size"):
        t[key] = _small(t[key])
    if t["prog_resize_min_size"] is not None:
        t["prog_resize_min_size"] = _small(t["prog_resize_min_size"])
        t["prog_resize_step"] = 4
    tree["eval"]["batch_size"] = 32
    return Params.model_validate(tree)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.training.trainer import init_ray

    init_ray()
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize("preset", [p for p in PRESETS if p.stem != "imagenet-resnet50"], ids=lambda p: p.stem)
def test_tiny_version_of_each_preset_trains(ray_local, synthetic_shards: Path, tmp_path: Path, preset: Path) -> None:
    import math

    from pipeline.training.trainer import build_trainer, make_job, run

    p = tiny(preset, synthetic_shards, tmp_path / "ckpt")
    arch = p.model.archs[0]
    job = make_job(p, arch, p.train.lr, p.train.lr_warmup_epochs, p.train.epochs, None)
    outcome = run(build_trainer(job, p, name=f"tiny-{preset.stem}", num_workers=0, storage_path=str(tmp_path)))
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    assert all(math.isfinite(h["train_loss"]) for h in outcome.history)
    assert outcome.history[-1]["val_images"] == 16
    assert outcome.state["config"]["train"] == p.train.model_dump(mode="json")
