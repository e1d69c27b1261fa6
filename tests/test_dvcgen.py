"""dvc.yaml is what `python -m pipeline.dvcgen` writes: no list in it is kept by hand. The committed file must be
the generator's output (an edit of identity.py, of a stage's imports or of the stage table without regenerating
fails here, with the diff), and the generator's pieces do what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline import dvcgen
from pipeline.training import identity

ROOT = Path(__file__).resolve().parent.parent


def test_committed_dvc_yaml_is_what_the_generator_writes() -> None:
    diff = dvcgen.check((ROOT / "dvc.yaml").read_text())
    assert diff == "", f"dvc.yaml is stale: run `python -m pipeline.dvcgen` (make dvcgen) and commit it\n{diff}"


def test_a_param_removed_from_train_is_a_diff_naming_it() -> None:
    # The check can fail: dvc.yaml without a param train@ARCH reads (its lr) is not the generator's output.
    text = (ROOT / "dvc.yaml").read_text()
    train = text.index("\n  train:\n")
    line = "        - train.lr\n"
    at = text.index(line, train)
    diff = dvcgen.check(text[:at] + text[at + len(line):])
    assert "+        - train.lr\n" in diff.splitlines(keepends=True)


def test_the_written_text_is_the_spec() -> None:
    # The small YAML writer loses nothing: DVC reads exactly the stage table, identity.py and the closures.
    assert yaml.safe_load(dvcgen.render()) == dvcgen.spec()


@pytest.mark.parametrize("stage", sorted(identity.STAGES))
def test_identity_stages_list_exactly_the_identity_params(stage: str) -> None:
    body = dvcgen.spec()["stages"][stage]
    listed = body.get("do", body)["params"]
    assert listed == [k.replace(identity.ARCH, "${item}") for k in identity.stage_params(stage)]
    assert len(listed) == len(set(listed))


def test_foreach_stages_keep_their_names_and_dag() -> None:
    stages = dvcgen.spec()["stages"]
    assert list(stages) == ["synthesize", "prepare", "tune", "train", "evaluate", "report", "degradation", "register"]
    for name in ("train", "evaluate"):
        assert stages[name]["foreach"] == "${model.archs}"
    train = stages["train"]["do"]
    assert "tune/best.json" in train["deps"] and train["outs"] == ["models/${item}"]
    assert "models/${item}" in stages["evaluate"]["do"]["deps"]


def test_cli_check_exits_1_with_a_diff_for_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stale = tmp_path / "dvc.yaml"
    stale.write_text((ROOT / "dvc.yaml").read_text().replace("      - eval.ten_crop\n", ""))
    assert dvcgen.main(["--check", "--output", str(stale)]) == 1
    out = capsys.readouterr()
    assert "eval.ten_crop" in out.out and "python -m pipeline.dvcgen" in out.err
    assert dvcgen.main(["--output", str(stale)]) == 0  # rewrites it
    assert dvcgen.main(["--check", "--output", str(stale)]) == 0


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_code_deps_list_a_directory_only_when_used_whole(tmp_path: Path) -> None:
    _package(tmp_path, {
        "stages/s.py": "from pipeline import a\n",
        "pipeline/__init__.py": '"""doc"""\n',
        "pipeline/a.py": "def f():\n    from pipeline.whole import x\n    from pipeline.part import y\n",
        "pipeline/whole/__init__.py": "",
        "pipeline/whole/x.py": "from .z import Z\n",
        "pipeline/whole/z.py": "Z = 1\n",
        "pipeline/part/__init__.py": "",
        "pipeline/part/y.py": "import os\n",
        "pipeline/part/unused.py": "import sys\n",
        "pipeline/typing_only.py": "",
        "pipeline/b.py": "",
    })
    (tmp_path / "pipeline/a.py").write_text((tmp_path / "pipeline/a.py").read_text() + (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline import typing_only\n"))
    assert dvcgen.code_deps(tmp_path / "stages/s.py", tmp_path) == [
        "pipeline/a.py", "pipeline/part/y.py", "pipeline/whole"]


def test_a_cmd_that_is_not_a_stage_module_is_refused() -> None:
    with pytest.raises(ValueError, match="python -m stages.NAME"):
        _ = dvcgen.Stage(cmd="bash run.sh", params=()).entry
