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


# --- one writer per output, no moment without the output -----------------------------------------------------------


def test_publish_dir_never_leaves_the_destination_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import runtime

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = runtime.temp_dir_beside(out)
    (new / "new.txt").write_text("new")
    seen: list[bool] = []
    real_replace, real_rmtree = os.replace, runtime.shutil.rmtree

    def replace(a: object, b: object) -> None:  # every rename publish_dir makes: is `out` there after it?
        real_replace(a, b)
        seen.append(out.is_dir())

    def rmtree(path: object, *a: object, **kw: object) -> None:
        seen.append(out.is_dir())
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(runtime.shutil, "rmtree", rmtree)
    runtime.publish_dir(new, out)
    assert seen and all(seen), seen
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # neither the temp nor the old folder is left


def test_temp_dirs_are_unique_and_a_killed_runs_are_cleaned(tmp_path: Path) -> None:
    from pipeline import runtime

    out = tmp_path / "model"
    a, b = runtime.temp_dir_beside(out), runtime.temp_dir_beside(out)
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".model.") and a.suffix == ".tmp"
    (tmp_path / ".other.x.tmp").mkdir()  # another output's: not ours to remove
    assert sorted(runtime.clean_stale_temps(out)) == sorted([a, b])
    assert [p.name for p in tmp_path.iterdir()] == [".other.x.tmp"]


HOLD_LOCK = (
    "import sys, time\n"
    "from pipeline.runtime import output_lock\n"
    "with output_lock(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


@pytest.mark.subprocess
def test_second_prepare_on_one_output_refused_naming_the_holder_then_a_killed_holder_is_taken_over(
        tmp_path: Path, synthetic_tree: object) -> None:
    import signal
    import socket
    import subprocess

    from pipeline.config import load_params
    from pipeline.data.prepare import prepare_from_params
    from pipeline.runtime import OutputLocked, lock_file

    shards = tmp_path / "shards"
    p = load_params(ROOT / "params.yaml", [f"data.raw_dir={os.fspath(synthetic_tree)}", "data.source=auto",
                                           f"data.shards_dir={shards}", "data.workers=1", "data.minival_per_class=0"])
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(shards)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked) as exc:
            prepare_from_params(p.data)
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(exc.value) and str(shards) in str(exc.value)
        assert not shards.exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: its lock file stays behind, but the kernel dropped the lock
        holder.wait(timeout=30)
    assert lock_file(shards).exists()
    manifest = prepare_from_params(p.data)
    assert manifest["num_classes"] == len(synthetic_tree.wnids)  # type: ignore[attr-defined]
    assert not lock_file(shards).exists()  # released and removed


def test_output_lock_is_reentrant_in_one_process_and_exclusive_across_descriptors(tmp_path: Path) -> None:
    import fcntl

    from pipeline.runtime import OutputLocked, lock_file, output_lock

    out = tmp_path / "out"
    with output_lock(out), output_lock(out):  # a stage and the library function it calls
        fd = os.open(lock_file(out), os.O_RDWR)
        try:  # what any other process sees: the lock is held
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert f"pid {os.getpid()}" in lock_file(out).read_text()
    assert not lock_file(out).exists()
    fd = os.open(lock_file(out), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by another open file description: refused, names the lock file
    try:
        with pytest.raises(OutputLocked, match=r"lock file .*\.out\.lock"), output_lock(out):
            pass
    finally:
        os.close(fd)


def test_output_lock_takes_away_the_folders_it_made_for_its_lock_file(tmp_path: Path) -> None:
    """A run refused before it writes (a symlink loop, a bad dataset) leaves no empty data/ behind; folders that
    hold the run's output, or were there before, stay."""
    from pipeline.runtime import output_lock

    with pytest.raises(RuntimeError), output_lock(tmp_path / "data" / "sub" / "shards"):
        raise RuntimeError("refused before writing")
    assert list(tmp_path.iterdir()) == []
    with output_lock(tmp_path / "data" / "sub" / "shards"):
        (tmp_path / "data" / "sub" / "shards").mkdir()
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == [
        "data", "data/sub", "data/sub/shards"]


def test_killed_prepares_done_temp_files_are_removed_on_resume(tmp_path: Path, synthetic_tree: object) -> None:
    from pipeline.data.prepare import DONE_DIR, prepare_shards

    shards = tmp_path / "shards"
    kw = {"max_side": 64, "rows_per_shard": 16, "workers": 1, "progress": False}
    first = prepare_shards(synthetic_tree, shards, **kw)  # type: ignore[arg-type]
    stale = shards / DONE_DIR / ".train-00000.json.4242.tmp"  # what write_atomic leaves when killed mid-write
    stale.write_text("{")
    (shards / "manifest.json").unlink()  # as if killed before the manifest: the next run resumes the plan
    again = prepare_shards(synthetic_tree, shards, **kw)  # type: ignore[arg-type]
    assert again["fingerprint"] == first["fingerprint"]
    assert not stale.exists()


KILLED_PREPARE = (
    "import sys\n"
    "from pipeline.data.prepare import prepare_shards\n"
    "prepare_shards(sys.argv[1], sys.argv[2], max_side=64, rows_per_shard=4, workers=2, progress=False)\n"
)


@pytest.mark.subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_prepares_pool_workers_end_with_it(tmp_path: Path) -> None:
    """kill -9 of a prepare with a process pool: its workers (children of the fork server, not of the killed
    process) exit too, and with them the fork server, instead of waiting forever on the dead run's queue."""
    import signal
    import subprocess
    import time

    from bench.hostile_input import descendants
    from pipeline.data.synthetic import generate_synthetic_imagenet

    raw = tmp_path / "raw"
    generate_synthetic_imagenet(raw, num_classes=4, train_per_class=80, val_per_class=2, image_size=32, seed=0)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(raw), str(tmp_path / "shards")], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 120
        below: set[int] = set()
        while time.monotonic() < deadline and proc.poll() is None:
            below = descendants(proc.pid)
            # The fork server, the resource tracker and two pool workers below it, and a shard written.
            if len(below) >= 4 and any((tmp_path / "shards" / "train").glob("*.parquet")):
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(below) >= 4, "prepare ended before it could be killed midway"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 60  # a generous bound for a loaded machine, not a timing assertion
    alive = below
    while alive and time.monotonic() < deadline:
        alive = {p for p in below if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        time.sleep(0.2)
    for p in alive:  # leave no orphan behind a failing run of this test
        os.kill(p, signal.SIGKILL)
    assert not alive, f"{len(alive)} of {len(below)} processes of the killed prepare still run"


# --- decompression bombs ----------------------------------------------------------------------------------------------


def _png(width: int, height: int, mode: str = "RGBA") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def test_image_over_the_pixel_budget_is_rejected_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from pipeline.data import prepare

    data = _png(300, 200)
    decoded: list[bool] = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(True) or real_load(self))
    with pytest.raises(prepare.RejectedImage, match=r"300x200 = 0.1 Mpx is over the pixel budget "
                                                    r"data.max_pixels=59999"):
        prepare.normalize_image(data, max_side=64, jpeg_quality=90, max_pixels=59_999)
    assert not decoded  # refused before decoding
    prepare.normalize_image(data, max_side=64, jpeg_quality=90, max_pixels=60_000)  # at the budget: kept
    assert decoded


def test_default_pixel_budget_rejects_a_bomb_in_pillows_warning_band(tmp_path: Path) -> None:
    """10000 x 9000 = 90 Mpx: above Pillow's 89.5 Mpx warning limit, below its 179 Mpx error, so Pillow alone
    decodes it (360 MB as RGBA); the default budget lists it in rejected.csv with its reason instead."""
    import csv

    from pipeline.config import DataParams
    from pipeline.data.prepare import DEFAULT_MAX_PIXELS, prepare_shards

    assert DataParams().max_pixels == DEFAULT_MAX_PIXELS == 50_000_000
    raw = tmp_path / "raw"
    for cls in ("a", "b"):
        for split in ("train", "val"):
            d = raw / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                (d / f"{i}.png").write_bytes(_png(8, 8, "RGB"))
    (raw / "train" / "a" / "bomb.png").write_bytes(_png(10_000, 9_000, "L"))
    prepare_shards(raw, tmp_path / "shards", max_side=64, workers=1, progress=False, max_rejected=1)
    rows = list(csv.DictReader((tmp_path / "shards" / "rejected.csv").open()))
    assert len(rows) == 1 and "bomb" in rows[0]["key"], rows
    assert "10000x9000 = 90.0 Mpx is over the pixel budget" in rows[0]["reason"]


# --- no silent no-op training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"epochs": 0}, r"train.epochs=0"),
    ({"num_classes": 1}, r"1 class\(es\)"),
    ({"batch_size": 65}, r"batch of 65, more than the 64 training images"),
    ({"batch_size": 66, "num_workers": 2}, r"batch_size=66 gives each of 2 worker\(s\) a batch of 33"),
    ({"batch_size": 1, "num_workers": 2}, r"smaller than train.num_workers=2"),
])
def test_check_trainable_refuses_runs_that_train_nothing(kw: dict[str, int], match: str) -> None:
    from pipeline.training.trainer import TrainingRefused, check_trainable

    args = {"n_train": 64, "num_classes": 4, "batch_size": 64, "num_workers": 1, "epochs": 1, **kw}
    with pytest.raises(TrainingRefused, match=match):
        check_trainable(**args)


def test_check_trainable_accepts_one_full_batch_per_worker() -> None:
    from pipeline.training.trainer import check_trainable

    check_trainable(n_train=64, num_classes=2, batch_size=64, num_workers=1, epochs=1)
    check_trainable(n_train=64, num_classes=2, batch_size=32, num_workers=2, epochs=1)
    check_trainable(n_train=64, num_classes=2, batch_size=8, num_workers=0, epochs=1)


def test_train_with_batch_larger_than_the_data_refused_before_mlflow(synthetic_shards: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.config import load_params
    from pipeline.training.trainer import TrainingRefused, train_arch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = load_params(ROOT / "params.yaml", [f"data.shards_dir={synthetic_shards}", "train.batch_size=4096",
                                           "train.num_workers=0", "train.use_tuned=false",
                                           f"train.storage_path={tmp_path / 'ray'}"])
    with pytest.raises(TrainingRefused, match="batch_size=4096"):
        train_arch(p, "resnet18", out_dir=tmp_path / "model", metrics_path=tmp_path / "m.json",
                   curve_path=tmp_path / "c.csv", best_path=None)
    assert sorted(q.name for q in tmp_path.iterdir()) == []  # no MLflow store, no model, no Ray folder


# --- no secret in a log -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,shown", [
    ("postgresql://bob:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("'s3://AKIA:se/cr@t@bucket/shards' missing", "'s3://***@bucket/shards' missing"),
    ("https://h:5000/x and http://u@h/y", "https://h:5000/x and http://***@h/y"),
    ("sqlite:////repo/mlflow.db", "sqlite:////repo/mlflow.db"),
])
def test_redact_uri_strips_userinfo(text: str, shown: str) -> None:
    from pipeline.runtime import redact_uri

    assert redact_uri(text) == shown


def test_error_lines_carry_no_uri_password(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit), cli.user_errors():
        raise FileNotFoundError("no manifest at s3://KEY:SECRET@bucket/shards/manifest.json")
    line = one_error_line(capsys)
    assert "SECRET" not in line and "s3://***@bucket/shards/manifest.json" in line


# --- symlinks in raw data -------------------------------------------------------------------------------------------


def _first_class(tree: object) -> Path:
    root = Path(os.fspath(tree))  # type: ignore[call-overload]
    return root / "train" / tree.wnids[0]  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["self", "ancestor"])
def test_symlink_loop_in_raw_data_is_a_data_error_naming_it(kind: str, tiny_folders_tree: object) -> None:
    from pipeline.data.sources import DataError, list_source

    cls = _first_class(tiny_folders_tree)
    link = cls / "loop"
    link.symlink_to("loop" if kind == "self" else "..")
    with pytest.raises(DataError, match=r"symlink loop.*loop"):
        list_source(tiny_folders_tree)  # type: ignore[arg-type]


def test_symlink_out_of_raw_dir_is_not_followed(tiny_folders_tree: object, tmp_path: Path) -> None:
    from pipeline.data.sources import DataError, list_source

    outside = tmp_path / "outside.JPEG"
    outside.write_bytes((_first_class(tiny_folders_tree) / f"{tiny_folders_tree.wnids[0]}_0.JPEG").read_bytes())  # type: ignore[attr-defined]
    (_first_class(tiny_folders_tree) / "escape.JPEG").symlink_to(outside)
    with pytest.raises(DataError, match=r"escape.JPEG is a symlink to .*outside.JPEG, outside data.raw_dir"):
        list_source(tiny_folders_tree)  # type: ignore[arg-type]


def test_symlink_inside_raw_dir_is_followed(tiny_folders_tree: object) -> None:
    from pipeline.data.sources import list_source

    cls = _first_class(tiny_folders_tree)
    (cls / "again.JPEG").symlink_to(cls / f"{tiny_folders_tree.wnids[0]}_0.JPEG")  # type: ignore[attr-defined]
    keys = {s.key for s in list_source(tiny_folders_tree).samples}  # type: ignore[arg-type]
    assert f"train/{cls.name}/again.JPEG" in keys
