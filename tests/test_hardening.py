"""Hostile and careless input: no code runs from a registry, no two runs write one output, no decompression bomb
is decoded, no training that would do nothing starts, no secret reaches a log, and every expected failure is
one line with a non-zero exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cli

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr's last line, checked to be an error line without a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1], err
    return lines[-1]


# --- one-line errors ------------------------------------------------------------------------------------------------


def test_set_with_broken_yaml_is_one_line_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.stage_args("t", argv=["--params", str(ROOT / "params.yaml"), "--set", "train.lr=[0.1"])
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "train.lr" in line and "[0.1" in line


@pytest.mark.parametrize("stage", ["stages.train", "stages.evaluate"])
def test_stage_unknown_arch_is_refused_by_argparse(stage: str, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    monkeypatch.setattr(sys, "argv", [stage, "--arch", "resnet19", "--params", str(ROOT / "params.yaml")])
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(stage).main()
    assert exc.value.code == 2
    line = one_error_line(capsys)
    assert "'resnet19'" in line and "resnet18" in line


def test_pipeline_train_unknown_arch_refused_before_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--arch", "resnet19", "--data", str(tmp_path), "--params", str(ROOT / "params.yaml")])
    assert exc.value.code == 2
    assert "resnet19" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # no shards, no runs/, no mlflow.db


@pytest.mark.parametrize("flag,key", [("--epochs", "train.epochs"), ("--batch-size", "train.batch_size"),
                                      ("--lr", "train.lr")])
def test_pipeline_train_zero_flags_are_refused_not_dropped(flag: str, key: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--arch", "resnet18", flag, "0", "--params", str(ROOT / "params.yaml")])
    assert exc.value.code == 2
    assert key in one_error_line(capsys)


def test_predict_missing_model_and_bad_topk_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.__main__ import main

    image = tmp_path / "a.jpg"
    image.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(tmp_path / "missing"), "--image", str(image)])
    assert exc.value.code == 1
    assert "missing" in one_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--model", str(tmp_path / "missing"), "--image", str(image), "--topk", "-3"])
    assert exc.value.code == 2
    assert "--topk" in one_error_line(capsys)


def test_user_errors_one_line_and_debug_keeps_traceback(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.data.shards import ManifestError

    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exc, cli.user_errors():
        raise ManifestError("no shard manifest at x/manifest.json:\n run prepare")
    assert exc.value.code == 1
    assert one_error_line(capsys) == "error: no shard manifest at x/manifest.json: run prepare"
    with pytest.raises(KeyError), cli.user_errors():  # a bug is not a user error: its traceback stays
        raise KeyError("bug")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ManifestError), cli.user_errors():
        raise ManifestError("shown with its traceback under --debug")


# --- no code from the registry --------------------------------------------------------------------------------------


class _Payload(torch.nn.Module):
    """Unpickling it touches `marker`: what a hostile pickle-format model in a shared registry would do."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 2)
        return torch.softmax(self.fc(x.mean(dim=(2, 3))), dim=1)


@pytest.fixture
def sqlite_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    monkeypatch.setenv("PIPELINE_RUN_GROUP", "test-hardening")
    return tmp_path


@pytest.mark.server
def test_pickle_model_from_registry_is_refused_and_its_payload_never_runs(sqlite_registry: Path) -> None:
    import mlflow
    import mlflow.pytorch
    import numpy as np

    from pipeline import tracking

    marker = sqlite_registry / "payload-ran"
    run_id = tracking.start_run("test-hardening", "evil", {})
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(_Payload(marker), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    client = tracking._client()
    client.create_registered_model("evil")
    mv = client.create_model_version("evil", info.model_uri, run_id=run_id, model_id=info.model_id)
    client.set_registered_model_alias("evil", "champion", mv.version)
    assert not marker.exists()
    with pytest.raises(tracking.ModelRefused, match=r"models:/evil@champion: stored as a pickle"):
        tracking.load_registered_model("models:/evil@champion")
    assert not marker.exists()
    # The opt-in really unpickles (the payload is live, so the refusal above is what kept it from running).
    with pytest.raises(AttributeError):  # Path.touch returned None, which MLflow then calls .eval() on
        tracking.load_registered_model("models:/evil@champion", allow_pickle=True)
    assert marker.exists()

    # The project's own format, a pt2 program without bundled code, loads with pickle refused.
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    version = tracking.log_and_register_model(run_id, _Tiny().eval(), x, "good", "d", {}, {"classes": ["a", "b"]})
    module = tracking.load_registered_model(f"models:/good/{version}")
    assert tuple(module(torch.from_numpy(x)).shape) == (2, 2)
