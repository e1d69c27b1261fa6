"""One meaning per parameter file: PyYAML (YAML 1.1, what the stages read) and ruamel.yaml (YAML 1.2, what DVC
reads for `params:` and `dvc exp run -S`) must see the same values, or one file would train under two
identities."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from pipeline.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def yaml12(text: str) -> object:
    return YAML(typ="safe", pure=True).load(text)  # ruamel's safe loader: YAML 1.2 (no on/off/yes/no booleans)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_yaml_1_1_and_1_2_read_every_parameter_file_alike(path: Path) -> None:
    text = path.read_text()
    assert yaml.safe_load(text) == yaml12(text)


def test_amp_survives_a_pyyaml_round_trip_and_a_yaml_1_2_reading(tmp_path: Path) -> None:
    dumped = yaml.safe_dump(load_params(ROOT / "params.yaml").model_dump(mode="json"), sort_keys=False)
    assert yaml.safe_load(dumped) == yaml12(dumped)
    (tmp_path / "params.yaml").write_text(dumped)
    p = load_params(tmp_path / "params.yaml")
    assert p.train.amp == yaml12(dumped)["train"]["amp"] == load_params(ROOT / "params.yaml").train.amp


@pytest.mark.parametrize("spelling", ["off", "'off'", "false", "no"])
def test_old_amp_off_is_refused_naming_the_key_and_the_new_spelling(spelling: str) -> None:
    with pytest.raises(ParamsError, match=r"train\.amp.*amp: none"):
        load_params(ROOT / "params.yaml", [f"train.amp={spelling}"])
