"""The shards under DVC, with the real `dvc repro` in a temporary copy of the repository.

- `dvc repro prepare` twice: the second does nothing; the shards are tracked but never copied into the DVC
  cache (stored once); downstream stages depend on data/dataset.json, the manifest's byte copy.
- Prepare never destroys a dataset it was not asked to replace: the prepare stage pointed at another raw
  dataset stops naming both, and the README's fine-tuning command (`python -m pipeline train --data OTHER
  --pretrained FILE`) prepares into a folder of its own and leaves data/shards byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_repo, write_params

pytestmark = pytest.mark.subprocess  # every test here runs a CLI, make or dvc

TINY = {
    "data.synthetic.num_classes": 3,
    "data.synthetic.train_per_class": 8,
    "data.synthetic.val_per_class": 4,
    "data.synthetic.image_size": 32,
    "data.rows_per_shard": 8,
    "data.workers": 1,
    "model.archs": ["resnet18"],
    "train.epochs": 1,
    "train.epochs_by_arch": {},
    "train.batch_size": 8,
    "train.lr_warmup_epochs": 0,
    "train.max_failures": 0,
}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600,
         ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if ok and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A repository copy after `dvc repro prepare` (synthesize + prepare: no Ray, a few seconds)."""
    repo = copy_repo(tmp_path_factory.mktemp("clone"))
    write_params(repo, TINY)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true"}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"]):
        _run(cmd, repo, env, 60)
    _run(["dvc", "repro", "prepare"], repo, env)
    return {"repo": repo, "env": env, "before": _digest(repo / "data" / "shards")}


def test_shards_stored_once_and_never_replaced_by_another_dataset(repro: dict, tiny_imagefolder_tree) -> None:
    repo, env, before = repro["repo"], repro["env"], repro["before"]
    shards = repo / "data" / "shards"
    assert (repo / "data" / "dataset.json").read_bytes() == (shards / "manifest.json").read_bytes()
    second = _run(["dvc", "repro", "prepare"], repo, env)
    assert "didn't change" in second.stdout and "Running stage 'prepare'" not in second.stdout
    # Stored once: no shard's bytes are in DVC's cache (DVC 3 names cache files by their md5).
    cached = {p.parent.name + p.name for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    parquet = [p for p in shards.rglob("*.parquet")]
    assert parquet and not any(hashlib.md5(p.read_bytes()).hexdigest() in cached for p in parquet)
    lock = (repo / "dvc.lock").read_text()
    assert "data/dataset.json" in lock

    # The prepare stage pointed at another raw dataset stops, names both, and says how to replace on purpose.
    other = _run([sys.executable, "-m", "stages.prepare", "--set", f"data.raw_dir={tiny_imagefolder_tree.root}",
                  "--set", "data.source=auto"], repo, env, ok=False)
    assert other.returncode != 0
    assert str(tiny_imagefolder_tree.root) in other.stderr and "data/synthetic" in other.stderr
    assert "--replace" in other.stderr
    assert _digest(shards) == before

    # A params change that does not change the data: prepare reruns (its params changed) and resumes, but
    # data/dataset.json keeps its bytes, so DVC reruns nothing downstream of it.
    record = (repo / "data" / "dataset.json").read_bytes()
    write_params(repo, {"data.max_rejected": 0.02})
    assert "Running stage 'prepare'" in _run(["dvc", "repro", "prepare"], repo, env).stdout
    assert (repo / "data" / "dataset.json").read_bytes() == record and _digest(shards) == before


@pytest.mark.ray
# Slow (~1-2 min: a Ray Train run); the default suite covers the same guarantees without training: the prepare
# stage's refusal above, and the command line's own shards folder (tests/test_data.py).
@pytest.mark.slow
def test_readme_fine_tuning_on_another_dataset_leaves_the_shards_byte_identical(
    repro: dict, tiny_imagefolder_tree, tmp_path: Path
) -> None:
    import torch
    import torchvision

    repo, env, before = repro["repo"], repro["env"], repro["before"]
    shards = repo / "data" / "shards"
    # The README's fine-tuning command on another dataset (weights from a local file: nothing is downloaded).
    weights = tmp_path / "resnet18-local.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    train = _run([sys.executable, "-m", "pipeline", "train", "--arch", "resnet18", "--data",
                  str(tiny_imagefolder_tree.root), "--pretrained", str(weights), "--lr", "0.001", "--epochs", "1",
                  "--out", str(tmp_path / "flowers-model")], repo, env, timeout=900)
    assert "trained resnet18" in train.stdout
    assert _digest(shards) == before  # byte-identical: not one shard, manifest or record touched
    own = [p for p in (repo / "data").iterdir() if p.name.startswith("shards-imagefolder-")]
    assert len(own) == 1 and json.loads((own[0] / "manifest.json").read_text())["source"]["layout"] == "imagefolder"
    assert "didn't change" in _run(["dvc", "repro", "prepare"], repo, env).stdout
