"""A preset run as `dvc exp run -S` overrides (pipeline/experiments.py) gives exactly the preset's params: DVC's
own override code (`dvc.utils.hydra.apply_overrides`, what `-S` calls) applied to a copy of params.yaml must
validate to the same Params as the preset resolved over params.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from pipeline.config import load_params
from pipeline.experiments import hydra_value, main, overrides

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda f: f.name)
def test_overrides_over_the_baseline_are_the_preset(preset: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(params, overrides(preset))
    assert load_params(params).model_dump() == load_params(preset).model_dump()


def test_a_replaced_mapping_is_not_merged(tmp_path: Path) -> None:
    # The preset's train.epochs_by_arch replaces the baseline's: a plain `-S key={...}` would keep the other archs.
    preset = tmp_path / "configs" / "one.yaml"
    preset.parent.mkdir()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    preset.write_text("extends: ../params.yaml\nmodel:\n  archs: [resnet50]\ntrain:\n  epochs_by_arch: {resnet50: 3}\n"
                      "  amp: fp16\n")
    sets = overrides(preset)
    assert "~train.epochs_by_arch" in sets and "+train.epochs_by_arch={resnet50:3}" in sets
    apply_overrides(tmp_path / "params.yaml", sets)
    p = load_params(tmp_path / "params.yaml")
    assert p.train.epochs_by_arch == {"resnet50": 3} and p.train.amp == "fp16"


def test_hydra_values() -> None:
    assert [hydra_value(v) for v in (None, True, 3, 1e-4, "off", "it's", [1, "a"], {"k": None})] == [
        "null", "true", "3", "0.0001", "'off'", "'it\\'s'", "[1,'a']", "{k:null}"]


def test_show_prints_one_override_per_line_and_names_a_bad_file(capsys: pytest.CaptureFixture,
                                                                tmp_path: Path) -> None:
    assert main(["show", str(ROOT / "configs/fast.yaml")]) == 0
    assert "train.lr=1.7" in capsys.readouterr().out.splitlines()
    assert main(["show", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
