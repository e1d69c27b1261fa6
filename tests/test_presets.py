"""The presets in configs/: each is params.yaml plus only the keys that differ; each equals its namesake key by key,
against the source's table transcribed in docs/presets.md (the one home of that transcription); the paper's preset
is one DAG over all five depths; a tiny-data version of each (the same keys, small sizes) trains end to end on real
Ray Train and Ray Data."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import (
    EXTENDS,
    Params,
    ParamsError,
    TrainParams,
    load_params,
    preset_diff,
    resolve_tree,
    write_preset,
)
from pipeline.training.ema import update_decay  # torch at collection time, not inside a fast-tier test

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
DOC = ROOT / "docs" / "presets.md"
DVC = Path(shutil.which("dvc") or ROOT / ".venv" / "bin" / "dvc")
# Keys that change how a run uses its machines, not the recipe: the tables need not list them.
RUNTIME = {"epochs_by_arch", "cpus_per_worker", "max_failures", "storage_path", "log_grad_stats",
           "grad_stats_every_epochs", "val_every_epochs", "decode", "include_minival", "pretrained", "deterministic"}
RECIPE_KEYS = ["model.archs", "model.shortcut", "model.zero_init_residual", "model.dropout",
               *(f"train.{k}" for k in TrainParams.model_fields if k not in RUNTIME), "eval.ten_crop"]


def doc_tables(text: str) -> dict[str, dict[str, Any]]:
    """docs/presets.md's transcriptions: for each `## `configs/NAME.yaml`` section, {dotted key: value} from its
    table rows `| `key` | `value` | source |` (values are YAML)."""
    tables: dict[str, dict[str, Any]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^## `configs/([\w.-]+)\.yaml`", line)
        if head:
            current = tables.setdefault(head.group(1), {})
            continue
        row = re.match(r"^\| `([\w.]+)` \| `([^`]*)` \|", line)
        if row and current is not None:
            assert row.group(1) not in current, f"docs/presets.md: {row.group(1)} listed twice"
            current[row.group(1)] = yaml.safe_load(row.group(2))
    return tables


TABLES = doc_tables(DOC.read_text())


def value(p: Params, key: str) -> Any:
    node: Any = p
    for part in key.split("."):
        node = getattr(node, part)
    return node


def expected_table(preset: Path) -> dict[str, Any]:
    """The preset's transcribed table; a preset extending another preset inherits that one's rows."""
    table = TABLES.get(preset.stem)
    assert table is not None, f"docs/presets.md has no section for configs/{preset.name}"
    base = yaml.safe_load(preset.read_text()).get(EXTENDS)
    if base and (preset.parent / base).resolve().parent == preset.parent.resolve():
        return {**expected_table(preset.parent / base), **table}
    return table


def mismatches(p: Params, table: dict[str, Any]) -> list[str]:
    out = []
    for key, want in table.items():
        got = value(p, key)
        same = (math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) and isinstance(got, (int, float))
                else got == want)
        if not same:
            out.append(f"{key}: preset {got!r}, source table {want!r}")
    return out


def test_there_are_the_four_recipes() -> None:
    assert {"paper", "torchvision-v1", "torchvision-v2", "fast"} <= {p.stem for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_its_base_plus_only_what_differs(preset: Path) -> None:
    p = load_params(preset)
    diff = preset_diff(preset)  # refuses a preset without `extends`
    same = sorted(k for k, (base, mine) in diff.items() if base == mine)
    assert not same, f"{preset.name} repeats its base's values (drop them): {same}"
    # DVC keys train@ARCH on train.epochs_by_arch.ARCH: every arch needs its entry.
    assert set(p.train.epochs_by_arch) >= set(p.model.archs)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_equals_its_sources_table(preset: Path) -> None:
    table = expected_table(preset)
    missing = [k for k in RECIPE_KEYS if k not in table]
    assert not missing, f"docs/presets.md, configs/{preset.name}: recipe keys not transcribed: {missing}"
    assert mismatches(load_params(preset), table) == []


def test_a_changed_preset_value_fails_the_comparison(tmp_path: Path) -> None:
    preset = ROOT / "configs" / "torchvision-v2.yaml"
    tree = yaml.safe_load(preset.read_text())
    tree[EXTENDS] = str(ROOT / "params.yaml")
    tree["train"]["lr"] = 0.4
    changed = tmp_path / "torchvision-v2.yaml"
    changed.write_text(yaml.safe_dump(tree))
    assert mismatches(load_params(changed), TABLES["torchvision-v2"]) == [
        "train.lr: preset 0.4, source table 0.5"]


def test_per_gpu_batch_is_the_sources() -> None:
    """docs/presets.md's summary states each source's per-GPU batch x GPUs; the preset's global batch over its
    worker count must be it."""
    found = re.findall(r"^\| `([\w-]+)\.yaml` \|.*\| (\d+) x (\d+)[^|]*\|$", DOC.read_text(), flags=re.M)
    rows = {name: (int(per_gpu), int(gpus)) for name, per_gpu, gpus in found}
    assert set(rows) == {p.stem for p in PRESETS}
    for name, (per_gpu, gpus) in rows.items():
        t = load_params(ROOT / "configs" / f"{name}.yaml").train
        assert (t.batch_size // t.num_workers, t.num_workers, t.batch_size % t.num_workers) == (per_gpu, gpus, 0), name


def _ffcv_resolution(epoch: int, min_res: int, max_res: int, end_ramp: int, start_ramp: int) -> int:
    """FFCV train_imagenet.py's get_resolution, as written there."""
    import numpy as np

    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_fast_presets_resolution_per_epoch_is_ffcvs() -> None:
    from pipeline.data.augment import progressive_sizes

    t = load_params(ROOT / "configs" / "fast.yaml").train
    ours = progressive_sizes(t.epochs, t.train_crop_size, t.prog_resize_min_size, t.prog_resize_ramp_start,
                             t.prog_resize_ramp_end, t.prog_resize_step)
    # rn50_16_epochs.yaml: min_res 160, max_res 192, start_ramp 11, end_ramp 13.
    assert ours == [_ffcv_resolution(e, 160, 192, 13, 11) for e in range(16)]


def test_derived_recipe_figures() -> None:
    paper = load_params(ROOT / "configs" / "paper.yaml").train
    assert round(60e4 * paper.batch_size / 1_281_167) == paper.epochs  # "up to 60 x 10^4 iterations"
    v2 = load_params(ROOT / "configs" / "torchvision-v2.yaml").train
    assert update_decay(v2.model_ema_decay, v2.batch_size, v2.model_ema_steps, v2.epochs) == pytest.approx(
        0.998908, abs=1e-6)  # the figure docs/presets.md quotes
    fast = load_params(ROOT / "configs" / "fast.yaml").train
    assert fast.lr * 256 / fast.batch_size == pytest.approx(0.106, abs=5e-4)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_no_yaml_1_1_boolean_lookalikes(preset: Path) -> None:
    # YAML 1.1 (PyYAML) reads a bare on/off/yes/no as a bool, YAML 1.2 (DVC's ruamel) as a string.
    bare = re.findall(r"^\s*(\w+):\s*(on|off|yes|no|y|n)\s*(?:#.*)?$", preset.read_text(), flags=re.M | re.I)
    assert not bare, f"{preset.name}: quote or replace {bare}"


def test_written_preset_is_the_params_file_dvc_reads(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    for preset in PRESETS:
        shutil.copy(preset, repo / "configs" / preset.name)
    written = write_preset(repo / "configs" / "fast.yaml", repo / "params.yaml")
    assert written == load_params(ROOT / "configs" / "fast.yaml")
    assert load_params(repo / "params.yaml") == written  # a whole params file now, no `extends`
    assert EXTENDS not in resolve_tree(repo / "params.yaml")
    # Another preset over a generated params.yaml would merge onto the first one: refused, naming the fix.
    with pytest.raises(ParamsError, match="git checkout params.yaml"):
        load_params(repo / "configs" / "paper.yaml")


def test_extends_errors_name_the_file(tmp_path: Path) -> None:
    loop = tmp_path / "a.yaml"
    loop.write_text("extends: a.yaml\n")
    with pytest.raises(ParamsError, match="extends itself"):
        load_params(loop)
    bad = tmp_path / "b.yaml"
    bad.write_text(f"extends: {ROOT / 'params.yaml'}\ntrain: {{lr_scheduler: poly}}\n")
    with pytest.raises(ParamsError, match=r"b\.yaml: train\.lr_scheduler"):
        load_params(bad)


@pytest.mark.subprocess
def test_paper_preset_is_one_dag_over_five_depths(tmp_path: Path) -> None:
    """dvc.yaml's foreach over model.archs gives the paper's preset a train and an evaluate stage per depth."""
    from tests.conftest import copy_repo

    repo = copy_repo(tmp_path / "repo")
    write_preset(ROOT / "configs" / "paper.yaml", repo / "params.yaml")
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
    tree: dict[str, Any] = resolve_tree(preset)
    arch = tree["model"]["archs"][0]
    tree["model"]["archs"] = [arch]
    tree["data"]["shards_dir"] = str(shards)
    t = tree["train"]
    t.update(epochs=2, epochs_by_arch={arch: None}, batch_size=16, lr=min(t["lr"], 0.1),
             lr_warmup_epochs=min(t["lr_warmup_epochs"], 1), num_workers=0, cpus_per_worker=2, use_gpu=False,
             amp="none", storage_path=str(storage), use_tuned=False, pretrained=None, compile=False)
    for key in ("train_crop_size", "val_resize_size", "val_crop_size"):
        t[key] = _small(t[key])
    if t.get("train_scale_range") is not None:
        t["train_scale_range"] = [_small(side) for side in t["train_scale_range"]]
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
