"""params.yaml is the one home of every default: each schema default in pipeline/config.py equals params.yaml's
value for that key, params.yaml sets every key of the schema, and every preset in configs/ reaches params.yaml
through its `extends` chain (that a preset repeats none of its base's values is tests/test_presets.py's check).
So a preset or a test that omits a key gets the documented value, whichever of the two it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import EXTENDS, Params, load_params

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def _is_section(field: Any) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the schema (dotted, recursively over sections) -> its field."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if _is_section(field):
            out.update(leaves(field.annotation, prefix + name + "."))
        else:
            out[prefix + name] = field
    return out


def value_at(node: Any, key: str) -> Any:
    for part in key.split("."):
        node = getattr(node, part)
    return node


def default_mismatches(schema: type[BaseModel], params: Params) -> list[str]:
    """Keys whose schema default differs from the validated value in `params`, each with both values."""
    out = []
    for key, field in leaves(schema).items():
        default, documented = field.get_default(call_default_factory=True), value_at(params, key)
        if default != documented:
            out.append(f"{key}: schema {default!r}, params.yaml {documented!r}")
    return out


def test_every_schema_default_is_params_yaml_value() -> None:
    assert default_mismatches(Params, load_params(ROOT / "params.yaml")) == []


def test_params_yaml_sets_every_key_of_the_schema() -> None:
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())

    def missing(model: type[BaseModel], node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            if name not in node:
                out.append(prefix + name)
            elif _is_section(field):
                out += missing(field.annotation, node[name], prefix + name + ".")
        return out

    assert missing(Params, tree, "") == []


def test_a_changed_schema_default_is_caught() -> None:
    """The comparison can fail: a schema whose default moved away from params.yaml is named, key and values."""
    from pipeline.config import TrainParams

    class Moved(TrainParams):
        epochs: int = 91

    class Schema(Params):
        train: Moved = Moved()

    p = load_params(ROOT / "params.yaml")
    assert default_mismatches(Schema, p) == [f"train.epochs: schema 91, params.yaml {p.train.epochs}"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_extends_params_yaml(preset: Path) -> None:
    chain, path = [preset.name], preset
    while True:
        base = yaml.safe_load(path.read_text()).get(EXTENDS)
        assert base, f"{' -> '.join(chain)}: ends without `{EXTENDS}: ../params.yaml`"
        path = (path.parent / base).resolve()
        chain.append(base)
        if path == (ROOT / "params.yaml").resolve():
            break
        assert len(chain) < 10, f"{' -> '.join(chain)}: no end"
