"""One notion of "the same training run": dvc.yaml's params, Ray's run name and MLflow's resume key all come from
pipeline/training/identity.py (pipeline/dvcgen.py writes its lists into dvc.yaml: tests/test_dvcgen.py). These
tests classify every field, and run the real DVC on the real dvc.yaml to show which stages an edit reruns."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, load_params, resolve_tree
from pipeline.training import identity
from tests.conftest import copy_repo

ROOT = Path(__file__).resolve().parent.parent
FP = "f" * 64


def test_every_model_train_eval_field_is_trajectory_or_runtime() -> None:
    # A new field must be classified: otherwise it would silently be neither a DVC dependency nor in the run name.
    p = Params()
    fields = {f"{section}.{name}" for section in ("model", "train", "eval")
              for name in type(getattr(p, section)).model_fields}
    classified = {k.replace("." + identity.ARCH, "") for keys in identity.STAGES.values() for k in keys}
    classified |= set(identity.RUNTIME)
    assert fields - classified == set(), "classify these in pipeline/training/identity.py"
    assert not set(identity.RUNTIME) & {k for keys in identity.STAGES.values() for k in keys}


@pytest.mark.parametrize("params_file", [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))],
                         ids=lambda f: f.name)
def test_every_listed_key_exists_in_the_params_file(params_file: Path) -> None:
    # DVC refuses a params dependency whose key is missing from the file (the stage does not run), so the
    # default file and every preset (as `python -m pipeline.config preset` writes it) must hold them all.
    tree = resolve_tree(params_file)  # a preset: its keys over the file it extends, as `pipeline.config preset` writes
    archs = load_params(params_file).model.archs
    missing = []
    for stage, keys in identity.STAGES.items():
        for key in keys:
            for concrete in ({key.replace(identity.ARCH, a) for a in archs} if identity.ARCH in key else {key}):
                node: Any = tree
                for part in concrete.split("."):
                    if not isinstance(node, dict) or part not in node:
                        missing.append(f"{stage}: {concrete}")
                        break
                    node = node[part]
    assert missing == [], f"{params_file.name} lacks keys dvc.yaml depends on: {missing}"


def _name(p: Params, arch: str = "resnet18", lr: float = 0.1, warmup: int = 1, fp: str = FP) -> str:
    return identity.train_run_name(p, arch, lr=lr, lr_warmup_epochs=warmup, data_fingerprint=fp)


@pytest.mark.parametrize("override", [
    "eval.batch_size=7", "eval.ray_min_images=0", "train.max_failures=5", "train.storage_path=s3://b/x",
    "train.cpus_per_worker=3", "train.channels_last=false", "tune.num_samples=9", "tracking.experiment=other",
    "registry.alias=best", "degradation.epochs=9", "train.epochs_by_arch.resnet152=7", "data.workers=1",
    "model.archs=[resnet18]", "train.log_grad_stats=true", "eval.precision=bf16",
    # the tuned lr is used (it reaches the name as `lr`), so the params' lr is not this run's
    "train.lr=0.05", "train.lr_warmup_epochs=0",
])
def test_runtime_edits_keep_the_run_name(override: str) -> None:
    base = load_params(ROOT / "params.yaml")
    assert base.train.use_tuned
    assert _name(load_params(ROOT / "params.yaml", [override])) == _name(base)


@pytest.mark.parametrize("override", [
    "seed=1", "train.batch_size=32", "train.epochs=7", "train.epochs_by_arch.resnet18=9", "train.weight_decay=0.001",
    "train.amp=bf16", "model.dropout=0.2", "train.num_workers=2", "train.train_crop_size=24", "train.lr_scheduler=step",
    "train.include_minival=false",
])
def test_trajectory_edits_change_the_run_name(override: str) -> None:
    base = load_params(ROOT / "params.yaml")
    changed = load_params(ROOT / "params.yaml", [override])
    assert _name(changed) != _name(base)


def test_resolved_values_are_what_counts() -> None:
    p = load_params(ROOT / "params.yaml")
    assert _name(p, lr=0.2) != _name(p) and _name(p, warmup=0) != _name(p) and _name(p, fp="0" * 64) != _name(p)
    # resnet50's own entry (3) decides its epochs: the global default does not reach it
    assert _name(load_params(ROOT / "params.yaml", ["train.epochs=9"]), "resnet50") == _name(p, "resnet50")
    # null entry = train.epochs, the same trajectory as writing the number
    explicit = load_params(ROOT / "params.yaml", [f"train.epochs_by_arch.resnet18={p.train.epochs}"])
    assert _name(explicit) == _name(p)
    assert _name(p).startswith("train-resnet18-") and _name(p, "resnet34") != _name(p)


def test_tune_name_ignores_training_only_and_runtime_params() -> None:
    p = load_params(ROOT / "params.yaml")
    base = identity.tune_run_name(p, "resnet18", FP)
    for override in ("train.epochs=9", "train.lr=0.3", "train.epochs_by_arch.resnet18=1", "eval.batch_size=3",
                     "train.max_failures=0", "train.include_minival=false",
                     # another arch added to the list: resnet18's own search is the same one (it resumes)
                     "tune.archs=[resnet18,resnet34,resnet50]"):
        assert identity.tune_run_name(load_params(ROOT / "params.yaml", [override]), "resnet18", FP) == base, override
    # train.num_workers splits train.batch_size into the per-worker batch every trial trains with
    for override in ("tune.num_samples=9", "train.batch_size=32", "seed=3", "train.num_workers=2"):
        assert identity.tune_run_name(load_params(ROOT / "params.yaml", [override]), "resnet18", FP) != base, override
    assert identity.tune_run_name(p, "resnet50", FP) != base


def test_unknown_key_or_stage_is_a_clear_error() -> None:
    p = Params()
    with pytest.raises(KeyError, match="train.nope"):
        identity.value(p, "train.nope")
    with pytest.raises(KeyError, match="'report'"):
        identity.stage_params("report")
    assert identity.value(p, "train.epochs_by_arch.resnet18") is None


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _changed_stages(status: str) -> set[str]:
    return {line[:-1] for line in status.splitlines() if line and not line[0].isspace() and line.endswith(":")}


@pytest.fixture(scope="module")
def committed_dag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's dvc.yaml + params.yaml with every stage recorded as done (`dvc commit` over placeholder
    outputs): what `dvc status` compares an edit against, without training anything."""
    repo = copy_repo(tmp_path_factory.mktemp("dag"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    # Re-dumped once, so that an edit re-dumped the same way changes only the edited key (PyYAML writes
    # YAML 1.1's `off` back as `false`, a different value for DVC's YAML 1.2 reader).
    tree = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    p = load_params(repo / "params.yaml")
    dirs = ["data/synthetic", "data/shards", "reports/degradation", *[f"models/{a}" for a in p.model.archs]]
    for d in dirs:
        (repo / d).mkdir(parents=True, exist_ok=True)
        (repo / d / "placeholder").write_text(d)
    reports = ("error_table.md", "error_table.csv", "error_vs_depth.png", "training_curves.png", "confusion.png")
    files = ["data/dataset.json", "tune/best.json", "tune/trials.csv", "tune/lr_vs_error.png",
             "metrics/degradation.json", "reports/registry.json", *[f"reports/{n}" for n in reports]]
    for a in p.model.archs:
        files += [f"metrics/train/{a}.json", f"plots/train/{a}.csv", f"metrics/eval/{a}.json",
                  f"reports/eval/{a}_details.json"]
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text(f)
    _dvc(repo, "commit", "--force", "--quiet")
    assert _changed_stages(_dvc(repo, "status")) == set()
    return repo


@pytest.mark.parametrize("edit, expected", [
    ({"train.epochs_by_arch.resnet152": 3}, {"train@resnet152"}),
    ({"eval.batch_size": 64}, set()),
    ({"eval.ray_min_images": 0}, set()),
    ({"train.max_failures": 3}, set()),
    ({"train.cpus_per_worker": 1.0}, set()),
    ({"tracking.experiment": "other"}, {"register"}),  # the registry is written to that experiment
    ({"tune.num_samples": 4}, {"tune"}),  # train@ARCH follows only if tune/best.json then changes
    ({"eval.ten_crop": True}, {f"evaluate@{a}" for a in Params().model.archs}),
    ({"eval.precision": "bf16"}, {f"evaluate@{a}" for a in Params().model.archs}),  # every row, one precision
    ({"train.lr": 0.05}, {f"train@{a}" for a in Params().model.archs}),
    ({"train.batch_size": 32}, {"tune", *{f"train@{a}" for a in Params().model.archs}}),  # degradation: its own
])
@pytest.mark.subprocess
def test_dvc_status_reruns_only_what_an_edit_changes(committed_dag: Path, edit: dict[str, Any],
                                                     expected: set[str]) -> None:
    original = (committed_dag / "params.yaml").read_text()
    tree = yaml.safe_load(original)
    for key, value in edit.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    (committed_dag / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    try:
        assert _changed_stages(_dvc(committed_dag, "status")) == expected
    finally:
        (committed_dag / "params.yaml").write_text(original)
