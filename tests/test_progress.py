"""Console progress (pipeline.progress): the exact lines, their ETA arithmetic and cadence, and that the
training loop, prepare, evaluation and the tune callback print them."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.config import load_params
from pipeline.progress import (
    Progress,
    epoch_line,
    eta_s,
    format_duration,
    format_rate,
    progress_line,
    trials_line,
)

ROOT = Path(__file__).resolve().parent.parent

# The loop's line, parsed back: every field it promises (val top-1 only on an epoch that validated).
EPOCH_RE = re.compile(
    r"^(?P<arch>\S+) epoch (?P<epoch>\d+)/(?P<epochs>\d+)  loss (?P<loss>\d+\.\d{3})"
    r"(?:  val top-1 err (?P<val>\d+\.\d)%)?  (?P<rate>[\d,]+) img/s  epoch (?P<took>\S+)  ETA (?P<eta>\S+)$"
)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.4, "0s"), (2.5, "3s"), (42, "42s"), (59.4, "59s"), (59.6, "1m00s"), (185, "3m05s"),
    (3599.4, "59m59s"), (3600, "1h00m"), (3720, "1h02m"), (3779, "1h02m"), (6 * 3600 + 61, "6h01m"),
    (86400, "1d00h"), (2 * 86400 + 3 * 3600 + 59 * 60, "2d03h"),
    (None, "?"), (math.nan, "?"), (math.inf, "?"), (-1, "?"),
])
def test_format_duration(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_eta_is_the_pace_so_far_times_what_is_left() -> None:
    assert eta_s(3, 90, 300.0) == pytest.approx(87 * 100.0)
    assert eta_s(1, 4, 10.0) == pytest.approx(30.0)
    assert eta_s(0, 4, 10.0) is None  # nothing done yet: no pace to go by
    assert eta_s(4, 4, 10.0) == 0.0 and eta_s(5, 4, 10.0) == 0.0  # done (or over)
    assert eta_s(0, 0, 0.0) == 0.0  # nothing to do is done
    assert eta_s(2, 4, -1.0) is None


def test_epoch_line_exact() -> None:
    line = epoch_line("resnet50", 3, 90, loss=2.31449, val_top1_err=41.2345, images_per_s=1234.4, epoch_s=252.2,
                      eta=6 * 3600 + 61)
    assert line == "resnet50 epoch 3/90  loss 2.314  val top-1 err 41.2%  1,234 img/s  epoch 4m12s  ETA 6h01m"
    # an epoch that did not validate (train.val_every_epochs) shows no val column; the ETA may be unknown
    assert epoch_line("resnet18", 1, 2, loss=1.5, images_per_s=12.6, epoch_s=3.0, eta=None) == \
        "resnet18 epoch 1/2  loss 1.500  13 img/s  epoch 3s  ETA ?"
    assert epoch_line("resnet18", 2, 2, loss=0.25, images_per_s=math.nan, epoch_s=61, eta=0.0,
                      val_top1_err=math.nan) == "resnet18 epoch 2/2  loss 0.250  ? img/s  epoch 1m01s  ETA 0s"
    assert EPOCH_RE.match(line) and EPOCH_RE.match(line)["val"] == "41.2"


def test_progress_and_trials_lines_exact() -> None:
    assert progress_line("prepare", 13, 128, "shards", elapsed_s=30, rate=443.7, eta=265, rate_unit="img",
                         images=13312) == "prepare 13/128 shards (10%)  13,312 img  444 img/s  elapsed 30s  ETA 4m25s"
    assert progress_line("evaluate resnet50 val", 50000, 50000, "img", elapsed_s=25, rate=2000.0, eta=0.0) == \
        "evaluate resnet50 val 50,000/50,000 img (100%)  2,000 img/s  elapsed 25s"  # done: no ETA
    assert progress_line("x", 0, 0, "img", elapsed_s=0, rate=None, eta=None) == "x 0/0 img (100%)  ? img/s  elapsed 0s"
    assert trials_line("resnet18", total=8, finished=3, stopped=2, failed=0, running=2, pending=1, best=41.23) == (
        "tune resnet18 trials 5/8 done (3 finished, 2 stopped, 0 failed)  2 running  1 pending  "
        "best minival top-1 err 41.2%")
    assert trials_line("resnet18", total=4, finished=0, stopped=0, failed=1, running=0, pending=3) == \
        "tune resnet18 trials 1/4 done (0 finished, 0 stopped, 1 failed)  0 running  3 pending"
    assert format_rate(0.4, "img") == "0 img/s" and format_rate(None, "shards") == "? shards/s"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_prints_every_tenth_and_at_the_end() -> None:
    clock, lines = Clock(), []
    pr = Progress("evaluate resnet18 val", 50, "img", out=lines.append, clock=clock)
    for _ in range(50):
        clock.t += 0.5
        pr.advance(1)
    assert len(lines) == 10  # 5, 10, ..., 50: one per 10%, not one per image
    assert lines[0] == "evaluate resnet18 val 5/50 img (10%)  2 img/s  elapsed 3s  ETA 23s"
    assert lines[-1] == "evaluate resnet18 val 50/50 img (100%)  2 img/s  elapsed 25s"


def test_progress_prints_when_a_long_step_passes_the_minute_and_counts_only_this_runs_work() -> None:
    clock, lines = Clock(), []
    # A resumed prepare: 50 of 100 shards (51,200 images) were done by an earlier run.
    pr = Progress("prepare", 100, "shards", done=50, images=51200, out=lines.append, clock=clock, every_s=60)
    clock.t += 30
    assert pr.advance(1, images=1024) is None  # neither the next 10% (60) nor a minute
    clock.t += 31
    line = pr.advance(1, images=1024)  # a minute since the start: a line, though 52 < 60
    assert line == lines[-1] == "prepare 52/100 shards (52%)  53,248 img  34 img/s  elapsed 1m01s  ETA 24m24s"
    # rates and ETA from this run's 2 shards in 61 s, not the 52 counted: 48 left x 30.5 s
    for _ in range(7):
        clock.t += 1
        pr.advance(1, images=1024)
    assert len(lines) == 1  # 53..59: below 60%, and under a minute since the last line
    clock.t += 1
    assert pr.advance(1, images=1024).startswith("prepare 60/100 shards (60%)  61,440 img")


def test_progress_without_output_only_counts() -> None:
    pr = Progress("prepare", 2, "shards", out=None, clock=Clock())
    assert pr.advance(2) is not None and pr.done == 2  # the line is still returned, nothing printed


def test_training_prints_one_line_per_epoch_on_rank_0(synthetic_shards, tmp_path, capsys) -> None:
    """The real loop (pipeline.training.loop.run_loop) in this process: one parseable line per epoch, with the
    epoch's reported loss and val error; epoch 1 of 3 does not validate (val_every_epochs=2), so it has no
    val column."""
    from pipeline.training.local import InMemoryShard, InProcessSession
    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    epochs = 3
    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", f"train.epochs={epochs}", "train.batch_size=16",
        "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.num_workers=0", "train.val_every_epochs=2",
    ])
    job = make_job(p, "resnet20", 0.05, 0, epochs, None)
    shard = InMemoryShard(job.train_files, crop=32, min_scale=0.35, limit=32)
    job.n_train, job.threads = len(shard), 1
    job.checkpoint_dir = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    session = InProcessSession(shard)
    capsys.readouterr()
    run_loop(job, session)
    out = capsys.readouterr().out
    lines = [m for m in map(EPOCH_RE.match, out.splitlines()) if m]
    assert len(lines) == epochs, out
    for i, (m, report) in enumerate(zip(lines, session.reports, strict=True)):
        assert (m["arch"], int(m["epoch"]), int(m["epochs"])) == ("resnet20", i + 1, epochs)
        assert float(m["loss"]) == pytest.approx(report["train_loss"], abs=5e-4)
        assert int(m["rate"].replace(",", "")) == round(report["images_per_s"])
        assert m["took"] != "?"
    assert lines[0]["val"] is None  # epoch 1 did not validate
    assert float(lines[1]["val"]) == pytest.approx(session.reports[1]["val_top1_err"], abs=0.05)
    assert lines[-1]["eta"] == "0s" and lines[0]["eta"] != "?"


def test_prepare_prints_plain_lines_off_a_terminal(tmp_path, capsys) -> None:
    """capsys's stderr is no TTY, as in `dvc repro` or `ray job logs`: lines, not a tqdm bar; the last one is
    the whole dataset."""
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.synthetic import generate_synthetic_imagenet

    generate_synthetic_imagenet(tmp_path / "raw", num_classes=2, train_per_class=12, val_per_class=4, image_size=24,
                                seed=0)
    capsys.readouterr()
    manifest = prepare_shards(tmp_path / "raw", tmp_path / "shards", max_side=32, rows_per_shard=4, workers=1,
                              progress=True)
    captured = capsys.readouterr()
    shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    images = sum(s["n_images"] for s in manifest["splits"].values())
    lines = [line for line in captured.out.splitlines() if line.startswith("prepare ")]
    assert lines and len(lines) <= shards, captured.out
    assert lines[-1].startswith(f"prepare {shards}/{shards} shards (100%)  {images:,} img  ")
    done = [int(re.match(r"prepare (\d+)/", line)[1]) for line in lines]
    assert done == sorted(set(done))
    assert "\r" not in captured.err + captured.out  # no bar redrawn in a log
    # Resumed with everything done: nothing to report, and no line claiming work.
    prepare_shards(tmp_path / "raw", tmp_path / "shards", max_side=32, rows_per_shard=4, workers=1, progress=True)
    assert "prepare " not in capsys.readouterr().out


def test_evaluation_prints_its_progress(synthetic_shards, tmp_path, capsys) -> None:
    import torch

    from pipeline.data.shards import read_manifest
    from pipeline.evaluation import evaluate_model
    from pipeline.models import build_model
    from pipeline.training.checkpoint import export_model_dir

    manifest = read_manifest(synthetic_shards)
    classes = [c["wnid"] for c in manifest["classes"]]
    torch.manual_seed(0)
    state = {
        "model": build_model("resnet20", num_classes=len(classes)).state_dict(), "epoch": 1, "arch": "resnet20",
        "model_kwargs": {}, "num_classes": len(classes), "classes": classes, "class_names": {},
        "eval_transform": {"resize": 36, "crop": 32, "interpolation": "bilinear", "antialias": True},
    }
    model = export_model_dir(tmp_path / "resnet20", state)
    capsys.readouterr()
    res = evaluate_model(str(model), str(synthetic_shards), batch_size=4, ray_min_images=10**9)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluate resnet20 val ")]
    n = res["n_images"]
    assert lines and lines[-1].startswith(f"evaluate resnet20 val {n}/{n} img (100%)  ")


def test_tune_callback_counts_how_trials_ended(capsys) -> None:
    """Tune calls on_trial_complete while the trial still says RUNNING (ray.tune's TuneController.stop_trial):
    the callback's own record decides; ASHA's early stop is a trial with fewer iterations than tune.epochs."""
    from pipeline.tuning import _trials_callback

    def trial(tid: str, status: str, iters: int = 0) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, status=status, last_result={"training_iteration": iters})

    cb = _trials_callback("resnet18", total=4, epochs=3)
    a, b, c = trial("a", "RUNNING", 3), trial("b", "RUNNING", 1), trial("c", "PENDING")
    cb.on_trial_result(iteration=1, trials=[a, b, c], trial=b, result={"val_top1_err": 60.0})
    cb.on_trial_result(iteration=2, trials=[a, b, c], trial=a, result={"val_top1_err": 41.25})
    cb.on_trial_result(iteration=3, trials=[a, b, c], trial=a, result={"val_top1_err": math.nan})
    cb.on_trial_complete(iteration=4, trials=[a, b, c], trial=b)  # stopped by ASHA after 1 of 3 epochs
    a.status, c.status = "TERMINATED", "RUNNING"
    cb.on_trial_complete(iteration=5, trials=[a, b, c], trial=a)
    c.status = "ERROR"
    cb.on_trial_error(iteration=6, trials=[a, b, c], trial=c)
    assert capsys.readouterr().out.splitlines() == [
        "tune resnet18 trials 1/4 done (0 finished, 1 stopped, 0 failed)  1 running  2 pending  "
        "best minival top-1 err 41.2%",
        "tune resnet18 trials 2/4 done (1 finished, 1 stopped, 0 failed)  1 running  1 pending  "
        "best minival top-1 err 41.2%",
        "tune resnet18 trials 3/4 done (1 finished, 1 stopped, 1 failed)  0 running  1 pending  "
        "best minival top-1 err 41.2%",
    ]
