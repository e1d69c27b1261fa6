"""The degradation stage (tiny real run, real MLflow), the training loop's gradient-statistics switch, and
`python -m pipeline analyze` on tiny exported models. CPU, one thread, a few seconds each."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.config import ParamsError, load_params

ROOT = Path(__file__).resolve().parent.parent
TINY_ARCHS = ["plain20", "plain32", "resnet20", "resnet32"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """The machine is shared: one intra-op thread (run_loop sets the job's), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("PIPELINE_RUN_GROUP", "test-degradation")
    return db


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()


# ---------------------------------------------------------------------------------------------------------
# The stage library
# ---------------------------------------------------------------------------------------------------------


def tiny_degradation_params(shards: Path, *sets: str):  # noqa: ANN201
    return load_params(ROOT / "params.yaml", [
        f"data.shards_dir={shards}", "degradation.enabled=true", f"degradation.archs={TINY_ARCHS}",
        "degradation.epochs=2", "degradation.batch_size=16", "degradation.train_images=32",
        "degradation.threads=1", "degradation.grad_batch=4", *sets,
    ])


@pytest.mark.heavy
def test_tiny_degradation_run_writes_figures_numbers_and_mlflow(synthetic_shards, mlflow_db, tmp_path) -> None:
    from pipeline import tracking
    from pipeline.analysis.degradation import run_degradation

    p = tiny_degradation_params(synthetic_shards)
    out, metrics_path = tmp_path / "reports" / "degradation", tmp_path / "metrics" / "degradation.json"
    record = run_degradation(p, out, metrics_path)

    for figure in ("degradation.png", "gradient_flow.png", "gradient_flow_init.png"):
        assert_png(out / figure)
    # One row per model per epoch, in the JSON and the CSV alike.
    saved = json.loads((out / "degradation.json").read_text())
    rows = saved["rows"]
    assert sorted((r["model"], r["epoch"]) for r in rows) == sorted((a, e) for a in TINY_ARCHS for e in (1, 2))
    with (out / "degradation.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["model"], int(r["epoch"])) for r in csv_rows] == [(r["model"], r["epoch"]) for r in rows]
    for row in rows:
        assert 0.0 <= row["train_top1_err"] <= 100.0 and 0.0 <= row["val_top1_err"] <= 100.0
        assert row["wall_time_s"] > 0 and row["epoch_time_s"] > 0
        assert row["family"] == ("plain" if row["model"].startswith("plain") else "residual")
    for arch in TINY_ARCHS:  # cumulative wall time grows epoch by epoch
        walls = [r["wall_time_s"] for r in rows if r["model"] == arch]
        assert walls == sorted(walls)
    budget = saved["budget"]
    assert budget["train_images_per_epoch"] == 32 and budget["epochs"] == 2 and budget["val_images"] == 16
    assert budget["wall_time_s"] > 0 and saved["synthetic"] is True
    assert {o["family"] for o in saved["observations"]} == {"plain", "residual"}
    assert set(saved["gradient_flow"]["trained"]) == set(TINY_ARCHS)
    assert len(saved["gradient_flow"]["init"]["plain20"]["norms"]) == 20  # one per weighted layer
    assert record["models"]["resnet32"]["layers"] == 32

    summary = (out / "degradation.md").read_text()
    assert "SYNTHETIC" in summary and "Budget used" in summary and "](degradation.png)" in summary
    for arch in TINY_ARCHS:
        final = record["models"][arch]
        assert f"| {arch} |" in summary and f"{final['val_top1_err']:.1f}" in summary

    metrics = json.loads(metrics_path.read_text())
    assert metrics["enabled"] == 1 and set(metrics["models"]) == set(TINY_ARCHS)
    assert metrics["models"]["plain20"]["val_top1_err"] == record["models"]["plain20"]["val_top1_err"]

    # MLflow: one run for the stage with the figures, a child run per model with its per-epoch curve.
    parent = record["mlflow_run_id"]
    children = tracking.child_runs(parent, p.tracking.experiment)
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == [f"degradation-{a}" for a in sorted(TINY_ARCHS)]
    for child in children:
        assert [step for step, _ in tracking.metric_history(child.info.run_id, "val_top1_err")] == [1, 2]
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(parent, "degradation")}
    assert {"degradation/degradation.png", "degradation/gradient_flow.png", "degradation/degradation.json",
            "degradation/degradation.md"} <= artifacts
    assert "val_top1_err/plain20" in tracking.run_metrics(parent)


@pytest.mark.subprocess
def test_disabled_stage_writes_only_a_summary(tmp_path: Path) -> None:
    """The real stage command with enabled=false: no data read (the shards path does not exist), nothing
    trained, no MLflow store touched, every declared output written; stale files of an earlier run go."""
    out, metrics_path = tmp_path / "reports" / "degradation", tmp_path / "metrics.json"
    out.mkdir(parents=True)
    (out / "degradation.png").write_bytes(b"stale")
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "stages.degradation", "--out", str(out), "--metrics", str(metrics_path),
           "--set", "degradation.enabled=false", "--set", f"data.shards_dir={tmp_path / 'no-shards'}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "switched off" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["degradation.csv", "degradation.json", "degradation.md"]
    assert "Switched off" in (out / "degradation.md").read_text()
    assert json.loads((out / "degradation.json").read_text())["enabled"] is False
    assert (out / "degradation.csv").read_text().startswith("model,family,layers,epoch,train_top1_err")
    assert json.loads(metrics_path.read_text()) == {"enabled": 0, "wall_time_s": 0.0}
    assert not db.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("degradation.epochz=3", "degradation.epochz: unknown key"),
        ("degradation.archs=[plain20,resnet19]", "unknown arch"),
        ("degradation.archs=[plain20,plain20]", "must not repeat"),
        ("degradation.lr_warmup_epochs=5", "lr_warmup_epochs must be smaller"),
        ("degradation.threads=0", "degradation.threads"),
        ("train.grad_stats_every_epochs=0", "train.grad_stats_every_epochs"),
    ],
)
def test_degradation_params_are_validated(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        load_params(ROOT / "params.yaml", [override])


def test_recipe_is_the_same_for_every_model_and_from_scratch() -> None:
    from pipeline.analysis.degradation import recipe_params
    from pipeline.training.loop import model_kwargs

    p = load_params(ROOT / "params.yaml", ["train.epochs_by_arch={plain56: 1}", "model.zero_init_residual=true"])
    run_p = recipe_params(p)
    assert run_p.train.epochs == p.degradation.epochs and run_p.train.epochs_for("plain56") == p.degradation.epochs
    assert run_p.train.lr == p.degradation.lr and not run_p.train.use_tuned and run_p.train.num_workers == 0
    assert run_p.train.momentum == p.train.momentum and run_p.train.lr_scheduler == p.train.lr_scheduler
    assert model_kwargs(run_p, "resnet56") == {"shortcut": "A", "zero_init_residual": False, "dropout": 0.0,
                                               "checkpoint_activations": False}
    assert "shortcut" not in model_kwargs(run_p, "plain56")  # plain nets have no shortcut to choose


def test_recipe_turns_off_the_per_image_policies_its_shard_cannot_apply() -> None:
    """The in-process shard crops and flips: a train recipe's decode-task policies are off, not recorded as
    applied, while the loop's mixup stays."""
    from pipeline.analysis.degradation import recipe_params

    p = load_params(ROOT / "params.yaml", ["train.auto_augment=ta_wide", "train.random_erase=0.1",
                                           "train.ra_sampler=true", "train.prog_resize_min_size=16",
                                           "train.mixup_alpha=0.2", "train.pca_lighting=0.1",
                                           "train.train_scale_range=[36, 64]"])
    tp = recipe_params(p).train
    assert (tp.auto_augment, tp.random_erase, tp.ra_sampler, tp.prog_resize_min_size) == (None, 0.0, False, None)
    assert (tp.pca_lighting, tp.train_scale_range) == (0.0, None)
    assert tp.mixup_alpha == 0.2


# ---------------------------------------------------------------------------------------------------------
# Gradient statistics in the training loop
# ---------------------------------------------------------------------------------------------------------


def run_in_process(shards: Path, tmp_path: Path, *sets: str, grad_stats: object = None,
                   ) -> tuple[list[dict], list[dict], str]:
    """run_loop on the tiny shards (resnet20, 2 epochs of 32 images) with an MLflow run:
    (session reports, the checkpoint's history, run id). `grad_stats`: the loop's hook (default: analysis's)."""
    from pipeline import tracking
    from pipeline.analysis.measure import gradient_stats
    from pipeline.training.checkpoint import load_train_state
    from pipeline.training.local import InMemoryShard, InProcessSession
    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={shards}", "train.epochs=2", "train.batch_size=16", "train.lr_warmup_epochs=0",
        "train.use_tuned=false", "train.num_workers=0", *sets,
    ])
    run_id = tracking.start_run(p.tracking.experiment, "grad-stats", {"test": "1"})
    job = make_job(p, "resnet20", 0.05, 0, p.train.epochs, run_id, grad_stats=grad_stats or gradient_stats)
    shard = InMemoryShard(job.train_files, crop=32, min_scale=0.35, limit=32)
    job.n_train, job.threads = len(shard), 1
    job.checkpoint_dir = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir(parents=True)
    session = InProcessSession(shard)
    run_loop(job, session)
    history = load_train_state(session.checkpoint_dir)["history"]
    return session.reports, history, run_id


def test_grad_stats_on_reach_the_reports_and_mlflow(synthetic_shards, mlflow_db, tmp_path) -> None:
    from pipeline import tracking

    reports, history, run_id = run_in_process(synthetic_shards, tmp_path, "train.log_grad_stats=true")
    for report in reports:
        assert {"grad_norm/conv1", "grad_norm/fc", "grad_norm/layer3.2.conv2", "grad_norm/total",
                "dead_relu/relu.call1", "dead_relu/layer1.0.relu.call2", "dead_relu/mean"} <= set(report)
        norms = [v for k, v in report.items() if k.startswith("grad_norm/") and k != "grad_norm/total"]
        assert len(norms) == 20 and all(math.isfinite(v) and v > 0 for v in norms)  # resnet20: 19 convs + fc
        assert report["grad_norm/total"] == pytest.approx(math.sqrt(sum(v * v for v in norms)))
        assert all(0.0 <= v <= 1.0 for k, v in report.items() if k.startswith("dead_relu/"))
    assert [step for step, _ in tracking.metric_history(run_id, "grad_norm/total")] == [1, 2]
    assert [step for step, _ in tracking.metric_history(run_id, "dead_relu/mean")] == [1, 2]
    assert not any(k.startswith(("grad_norm/", "dead_relu/")) for row in history for k in row)  # curve CSV unchanged


def test_grad_stats_interval_and_off(synthetic_shards, mlflow_db, tmp_path) -> None:
    from pipeline import tracking

    reports, _, run_id = run_in_process(synthetic_shards, tmp_path / "every2", "train.log_grad_stats=true",
                                        "train.grad_stats_every_epochs=2")
    assert ["grad_norm/total" in r for r in reports] == [False, True]
    assert [step for step, _ in tracking.metric_history(run_id, "grad_norm/total")] == [2]

    reports, _, run_id = run_in_process(synthetic_shards, tmp_path / "off")  # the default: off
    assert len(reports) == 2
    assert not any(k.startswith(("grad_norm/", "dead_relu/")) for r in reports for k in r)
    logged = tracking.run_metrics(run_id)
    assert "val_top1_err" in logged and not any(k.startswith(("grad_norm/", "dead_relu/")) for k in logged)


def test_grad_stats_are_the_hook_the_caller_passes(synthetic_shards, mlflow_db, tmp_path) -> None:
    """The loop measures with Job.grad_stats (training never imports pipeline.analysis): the bare model after
    backward and the batch's images reach the hook, whose metrics travel with the epoch's report."""
    seen: list[tuple[bool, tuple[int, ...]]] = []

    def hook(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
        seen.append((model.conv1.weight.grad is not None, tuple(images.shape)))
        return {"custom/stat": float(len(seen))}

    reports, history, _ = run_in_process(synthetic_shards, tmp_path, "train.log_grad_stats=true", grad_stats=hook)
    assert seen == [(True, (16, 3, 32, 32))] * 2  # one measured batch per epoch, gradients present
    assert [r["custom/stat"] for r in reports] == [1.0, 2.0]
    assert not any(k.startswith("grad_norm/") for r in reports for k in r)
    assert not any("custom/stat" in row for row in history)


def test_grad_stats_on_without_a_hook_is_refused(synthetic_shards, tmp_path) -> None:
    """train.log_grad_stats with no measurement to call fails before training, naming the fix, instead of
    silently logging nothing: at make_job (the driver) and at the loop's set-up (a Job built by hand)."""
    from pipeline.analysis.measure import gradient_stats
    from pipeline.training.local import InMemoryShard, InProcessSession
    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    p = load_params(ROOT / "params.yaml", [f"data.shards_dir={synthetic_shards}", "train.log_grad_stats=true"])
    with pytest.raises(ValueError, match=r"train.log_grad_stats is true .*grad_stats=pipeline.analysis.measure"):
        make_job(p, "resnet20", 0.05, 0, 1, None)
    job = make_job(p, "resnet20", 0.05, 0, 1, None, grad_stats=gradient_stats)
    job.grad_stats = None
    session = InProcessSession(InMemoryShard(job.train_files, crop=32, min_scale=0.35, limit=16))
    with pytest.raises(ValueError, match=r"train.log_grad_stats is true"):
        run_loop(job, session)
    assert session.reports == []


# ---------------------------------------------------------------------------------------------------------
# python -m pipeline analyze
# ---------------------------------------------------------------------------------------------------------


def export_tiny_model(arch: str, out: Path) -> Path:
    from pipeline.models import build_model
    from pipeline.training.checkpoint import export_model_dir

    torch.manual_seed(0)
    model = build_model(arch, num_classes=4)
    classes = [f"s{i:08d}" for i in range(4)]
    state = {
        "model": model.state_dict(), "epoch": 1, "arch": arch, "model_kwargs": {}, "num_classes": 4,
        "classes": classes, "class_names": {c: f"synthetic class {i}" for i, c in enumerate(classes)},
        "eval_transform": {"resize": 36, "crop": 32, "interpolation": "bilinear", "antialias": True},
    }
    return export_model_dir(out / arch, state)


def test_analyze_writes_every_figure(tmp_path, make_jpeg, capsys) -> None:
    from pipeline.__main__ import main

    model_dir = export_tiny_model("resnet20", tmp_path / "models")
    image = make_jpeg(tmp_path / "cat.jpg", size=(48, 40))
    out = tmp_path / "analysis"
    main(["analyze", "--model", str(model_dir), "--image", str(image), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("residual_flow.png", "gradient_flow.png", "feature_maps.png"):
        assert_png(out / name)
        assert str(out / name) in printed
    numbers = json.loads((out / "skip_contribution.json").read_text())
    assert numbers["residual_flow_block"] == "layer2.0" and len(numbers["skip_contribution"]) == 9
    assert all(s["ratio"] >= 0 for s in numbers["skip_contribution"].values())
    assert numbers["prediction"]["wnid"].startswith("s0000000")
    from pipeline.models import build_model, count_params

    total = count_params(build_model("resnet20", num_classes=4))
    assert f"Total params: {total:,}" in (out / "model_summary.txt").read_text()

    main(["analyze", "--model", str(model_dir), "--image", str(image), "--out", str(out / "l3"),
          "--layer", "layer3.1"])
    assert json.loads((out / "l3" / "skip_contribution.json").read_text())["residual_flow_block"] == "layer3.1"


def test_analyze_plain_net_has_no_residual_flow(tmp_path, make_jpeg) -> None:
    from pipeline.__main__ import main

    model_dir = export_tiny_model("plain20", tmp_path / "models")
    out = tmp_path / "analysis"
    main(["analyze", "--model", str(model_dir), "--image", str(make_jpeg(tmp_path / "x.jpg")), "--out", str(out)])
    assert not (out / "residual_flow.png").exists()
    assert_png(out / "gradient_flow.png")
    assert json.loads((out / "skip_contribution.json").read_text())["skip_contribution"] == {}


def test_analyze_errors_name_the_file(tmp_path, make_jpeg, capsys) -> None:
    from pipeline.__main__ import main

    model_dir = export_tiny_model("resnet20", tmp_path / "models")
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not a jpeg")
    cases = [
        (["--model", str(model_dir), "--image", str(broken)], "cannot read image " + str(broken)),
        (["--model", str(model_dir), "--image", str(tmp_path / "missing.jpg")], str(tmp_path / "missing.jpg")),
        (["--model", str(tmp_path / "nope"), "--image", str(broken)], str(tmp_path / "nope")),
        (["--model", str(model_dir), "--image", str(make_jpeg(tmp_path / "ok.jpg")), "--layer", "fc"],
         "not a residual block"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["analyze", *args, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
