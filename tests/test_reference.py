"""torchvision's pretrained weights, found locally: the report's reference row is evaluated with our code, and
`--pretrained` fine-tuning starts from them. No download: the "weights" are a torchvision model's state_dict
saved under torchvision's file name in a temporary TORCH_HOME (real pretrained weights need the network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline.models import build_model
from pipeline.models.pretrained import PretrainedNotFound, find_weights, init_from_pretrained, require_weights
from tests.conftest import write_image

RESIZE, CROP = 36, 32
N_VAL = 40


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


def _torchvision_predictions(model: torch.nn.Module, files: list[Path]) -> list[int]:
    """Top-1 classes of torchvision's own eval pipeline (PIL decode + the ImageClassification preset)."""
    from torchvision.transforms._presets import ImageClassification

    tf = ImageClassification(crop_size=CROP, resize_size=RESIZE)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(x).argmax(dim=1).tolist()


@pytest.mark.ray
def test_reference_row_is_torchvision_weights_through_our_evaluation(torch_home: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1000-class ImageFolder set whose val images are filed under the class torchvision's own pipeline
    predicts for them: torchvision's top-1 error is 0% by construction, so ours must be exactly 0% too; any
    difference in decoding, resizing, cropping, normalising or class order shows up as errors."""
    import ray

    from pipeline.data.prepare import prepare_shards
    from pipeline.evaluation import evaluate_reference
    from pipeline.runtime import init_ray

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=1000).eval()
    # Random BN statistics make the random net's logits depend on the image (default ones give near-ties).
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(tv.state_dict(), torch_home / "resnet18-f37072fd.pth")

    raw = tmp_path / "raw"
    for c in range(1000):  # every class needs a train folder; 16x12 px keeps this at ~1 s
        write_image(raw / "train" / f"c{c:04d}" / "t.jpg", size=(16, 12), seed=c)
    staged = [write_image(tmp_path / "staged" / f"v{i:03d}.jpg", size=(48, 40), seed=10_000 + i)
              for i in range(N_VAL)]
    predicted = _torchvision_predictions(tv, staged)
    assert len(set(predicted)) > 3, "the test needs a net whose predictions vary with the image"
    for f, c in zip(staged, predicted, strict=True):
        dest = raw / "val" / f"c{c:04d}" / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        f.rename(dest)
    manifest = prepare_shards(raw, tmp_path / "shards", max_side=512, rows_per_shard=512, workers=1,
                              progress=False)
    assert manifest["num_classes"] == 1000 and manifest["splits"]["val"]["n_images"] == N_VAL

    # The weight's own transform wins over the trained model's (here a wrong 44/40): shrunk to 36/32 so that a
    # random net's predictions still vary with the image (at 256/224 they collapse to one class).
    import pipeline.references

    monkeypatch.setattr(pipeline.references, "weights_transform", lambda arch, f: {"resize": RESIZE, "crop": CROP})
    kw = {"batch_size": 16, "eval_transform": {"resize": 44, "crop": 40}}
    # Below eval.ray_min_images the same decode + predictor code runs in this process; at or above it, as Ray
    # Data batch inference. Both must count the same.
    local = evaluate_reference("resnet18", str(tmp_path / "shards"), ray_min_images=10**9, **kw)
    init_ray()
    try:
        ref = evaluate_reference("resnet18", str(tmp_path / "shards"), ray_min_images=0, **kw)
    finally:
        ray.shutdown()
    assert ref is not None
    assert ref["weights"] == "resnet18-f37072fd.pth"
    assert ref["n_images"] == N_VAL
    assert ref["top1_err"] == 0.0 and ref["top5_err"] == 0.0
    assert local == ref


def test_reference_is_absent_or_skipped_and_the_report_says_so(torch_home: Path, synthetic_shards: Path) -> None:
    from pipeline.evaluation import evaluate_reference, table_rows
    from pipeline.report import render_markdown

    kw = {"batch_size": 8, "eval_transform": {"resize": RESIZE, "crop": CROP}}
    assert evaluate_reference("resnet34", str(synthetic_shards), **kw) is None  # nothing on this machine
    torch.save(torchvision.models.resnet34().state_dict(), torch_home / "resnet34-b627a593.pth")
    skipped = evaluate_reference("resnet34", str(synthetic_shards), **kw)  # 4 classes: not ImageNet-1k
    assert skipped == {"weights": "resnet34-b627a593.pth", "skipped": skipped["skipped"]}
    assert "4 classes" in skipped["skipped"]

    evals = [{"arch": a, "top1_err": 10.0, "top5_err": 1.0, "n_images": 16, "num_classes": 4,
              "protocol": "1-crop resize 36 crop 32"}
             for a in ("resnet18", "resnet50")]
    evals[1]["torchvision_reference"] = {"weights": "resnet50-0676ba61.pth", "top1_err": 24.0, "top5_err": 7.0,
                                         "n_images": 16, "protocol": "p"}
    rows = table_rows(evals, {}, {})
    assert rows[1]["torchvision_top1_err"] == 24.0 and rows[0]["torchvision_top1_err"] is None
    md = render_markdown(rows, {"layout": "folders"}, [], {"resnet50": evals[1]["torchvision_reference"]})
    assert "| 24.00 / 7.00 |" in md
    assert ("evaluated here with our evaluation code and precision and each weight's own transform: resnet50 "
            "(resnet50-0676ba61.pth)") in md
    assert "Not present locally for resnet18" in md and str(torch_home) in md


def test_find_and_require_weights(torch_home: Path, tmp_path: Path) -> None:
    assert find_weights("resnet50") is None
    with pytest.raises(PretrainedNotFound, match=r"resnet50 at .*resnet50-0676ba61\.pth.*never downloads"):
        require_weights("resnet50")
    (torch_home / "resnet50-11ad3fa6.pth").write_bytes(b"v2")
    assert find_weights("resnet50").name == "resnet50-11ad3fa6.pth"
    (torch_home / "resnet50-0676ba61.pth").write_bytes(b"v1")
    assert find_weights("resnet50").name == "resnet50-0676ba61.pth"  # V1 (the cheatsheet's numbers) first
    explicit = tmp_path / "mine.pth"
    explicit.write_bytes(b"x")
    assert require_weights("resnet50", explicit) == explicit


def test_init_from_pretrained_keeps_the_backbone_and_replaces_a_foreign_head() -> None:
    tv = torchvision.models.resnet18()
    state = tv.state_dict()
    ours = build_model("resnet18", num_classes=7)
    fresh_fc = ours.fc.weight.detach().clone()
    missing = init_from_pretrained(ours, state)
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    assert torch.equal(ours.conv1.weight, state["conv1.weight"])
    assert torch.equal(ours.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert torch.equal(ours.fc.weight, fresh_fc)
    same = build_model("resnet18", num_classes=1000)
    assert init_from_pretrained(same, state) == []  # same classes: the head is kept too
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(same.eval()(x), tv.eval()(x), atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        init_from_pretrained(build_model("resnet34", num_classes=1000), state)


@pytest.mark.subprocess
def test_train_pretrained_without_weights_is_a_clear_error(torch_home: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--arch", "resnet50", "--pretrained", "--lr", "0.001",
         "--out", str(tmp_path / "model")],
        cwd=root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --pretrained: no torchvision weights for resnet50 at")
    assert str(torch_home) in proc.stderr and "resnet50-0676ba61.pth" in proc.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.ray
def test_fine_tuning_starts_from_the_pretrained_backbone(torch_home: Path, synthetic_shards: Path,
                                                          tmp_path: Path) -> None:
    """`train.pretrained: torchvision` on a 4-class set: the backbone starts from the file's weights (after an
    epoch at a tiny lr it is still there), the 1000-class head is replaced by a fresh 4-class one."""
    import ray

    from pipeline.config import load_params
    from pipeline.runtime import init_ray
    from pipeline.training.trainer import build_trainer, make_job, run

    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, torch_home / "resnet18-f37072fd.pth")
    root = Path(__file__).resolve().parent.parent
    p = load_params(root / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", f"train.storage_path={tmp_path}", "train.epochs=1",
        "train.batch_size=16", "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.pretrained=torchvision",
        "train.weight_decay=0", "train.momentum=0"])
    job = make_job(p, "resnet18", 1e-7, 0, 1, None)
    assert job.pretrained_path == str(torch_home / "resnet18-f37072fd.pth")
    init_ray()
    try:
        outcome = run(build_trainer(job, p, name="finetune", num_workers=0, storage_path=str(tmp_path)))
    finally:
        ray.shutdown()
    trained = outcome.state["model"]
    assert trained["fc.weight"].shape == (4, 512)
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "layer4.1.conv2.weight"):
        assert torch.allclose(trained[key], state[key], atol=1e-4), key


# --- the published numbers as data (pipeline.references) --------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_torchvision_references_match_installed_torchvision(arch: str) -> None:
    """Our table's torchvision rows equal the installed torchvision's static metadata (no download): acc@1/acc@5
    and each weight's own eval transform (resize, crop, interpolation)."""
    from torchvision.transforms import InterpolationMode

    from pipeline.references import TORCHVISION, V2_FILES, references_for, weights_transform

    enum = torchvision.models.get_model_weights(arch)
    ours = {r["weights"]: r for r in references_for(arch) if r["source"].startswith("torchvision")}
    assert set(ours) == {w.name for w in enum}, f"{arch}: torchvision has {[w.name for w in enum]}"
    for w in enum:
        m = w.meta["_metrics"]["ImageNet-1K"]
        a1, a5, resize = TORCHVISION[(arch, w.name)]
        assert (a1, a5) == (m["acc@1"], m["acc@5"])
        assert ours[w.name]["top1_err"] == pytest.approx(100 - m["acc@1"])
        tf = w.transforms()
        assert tf.resize_size == [resize] and tf.crop_size == [224] == [ours[w.name]["crop"]]
        assert tf.interpolation == InterpolationMode.BILINEAR and ours[w.name]["interpolation"] == "bilinear"
        file = w.url.rsplit("/", 1)[-1]
        assert weights_transform(arch, file)["resize"] == resize
        assert (file in V2_FILES.values()) == (w.name == "IMAGENET1K_V2")


def test_paper_and_fb_references_match_the_docs_transcription() -> None:
    """docs/evaluation.md transcribes the paper's Tables 2-4 and fb.resnet.torch's table with their origins;
    the package's numbers must be the same."""
    from pipeline.references import REFERENCES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    table = doc.split("<!-- references:begin -->")[1].split("<!-- references:end -->")[0]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    transcribed = {}
    for arch, source, kind, top1, top5, _origin in cells:
        transcribed[(arch, source, kind)] = (float(top1), None if top5 == "—" else float(top5))
    ours = {(r["arch"], r["source"], r["kind"]): (r["top1_err"], r["top5_err"])
            for r in REFERENCES if not r["source"].startswith("torchvision")}
    assert ours == transcribed


# --- one precision for every row --------------------------------------------------------------------------


def _near_tied_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=1000).eval()
    for m in model.modules():  # image-dependent, near-tied logits: where bf16 and fp32 disagree
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _both_paths(tmp_path: Path, model: torch.nn.Module, precision: str) -> tuple:
    """The evaluate stage's two predictors on the same weights: ours (models/ARCH, exported by a run that
    trained with train.amp bf16) and the reference row's (a weights blob, no train config)."""
    from pipeline.evaluation import _Predictor
    from pipeline.training.checkpoint import export_model_dir

    model_dir = tmp_path / "resnet18"
    if not model_dir.exists():
        export_model_dir(model_dir, {"model": model.state_dict(), "arch": "resnet18", "model_kwargs": {},
                                     "num_classes": 1000, "eval_transform": {"resize": 36, "crop": 32}, "epoch": 1,
                                     "config": {"train": {"amp": "bf16", "channels_last": False}}})
    blob = {"state_dict": model.state_dict(), "arch": "resnet18", "num_classes": 1000, "model_kwargs": {},
            "eval_transform": {"resize": 36, "crop": 32}}
    return (_Predictor(threads=1, model_dir=str(model_dir), precision=precision),
            _Predictor(threads=1, blob=blob, precision=precision))


def _val_batch(n: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).numpy(),
            "key": np.arange(n), "label": np.zeros(n, dtype=np.int64)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trained_model_and_reference_paths_predict_identically(tmp_path: Path, precision: str) -> None:
    """The same weights through the trained-model path (trained with train.amp bf16) and through the reference
    path give bitwise-equal logits and the same top-5 on the same images, at eval.precision fp32 and bf16
    alike: both run at the evaluation precision, not each at its own."""
    trained, reference = _both_paths(tmp_path, _near_tied_resnet18(), precision)
    batch = _val_batch()
    x = torch.from_numpy(batch["image"])
    assert torch.equal(trained.logits(x), reference.logits(x))
    np.testing.assert_array_equal(trained(batch)["top5"], reference(batch)["top5"])


def test_both_paths_honour_eval_precision(tmp_path: Path) -> None:
    """fp32 (the default) is plain fp32 on both paths, whatever train.amp the run trained with; bf16 is bf16
    autocast on both (its logits differ from fp32's: the setting is not silently ignored)."""
    from pipeline.data.transforms import normalize

    model = _near_tied_resnet18()
    x = torch.from_numpy(_val_batch()["image"])
    with torch.no_grad():
        plain = model(normalize(x, False)).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(normalize(x, False)).float()
    assert not torch.equal(plain, bf16), "the test needs logits that bf16 rounds"
    for precision, expected in (("fp32", plain), ("bf16", bf16)):
        for path in _both_paths(tmp_path, model, precision):
            assert torch.equal(path.logits(x), expected), (precision, path.registered)


def test_evaluate_records_one_precision_for_ours_and_the_reference(
        torch_home: Path, synthetic_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate_model and evaluate_reference run their predictors at the `precision` given (the stage passes
    eval.precision to both) and their results, the metrics JSON, record it; the table rows carry it."""
    import pipeline.evaluation as ev
    from pipeline.data.shards import read_manifest
    from pipeline.evaluation import evaluate_model, evaluate_reference, table_rows
    from pipeline.training.checkpoint import export_model_dir

    manifest = read_manifest(synthetic_shards)
    classes = [c["wnid"] for c in manifest["classes"]]
    torch.manual_seed(0)
    model_dir = export_model_dir(tmp_path / "resnet20", {
        "model": build_model("resnet20", num_classes=len(classes)).state_dict(), "epoch": 1, "arch": "resnet20",
        "model_kwargs": {}, "num_classes": len(classes), "classes": classes, "class_names": {},
        "eval_transform": {"resize": 36, "crop": 32, "interpolation": "bilinear", "antialias": True},
        "config": {"train": {"amp": "bf16"}}})
    seen = []
    real = ev._Predictor.__init__

    def spy(self, *a, precision: str = "fp32", **kw) -> None:  # noqa: ANN001, ANN002, ANN003
        seen.append(precision)
        real(self, *a, precision=precision, **kw)

    monkeypatch.setattr(ev._Predictor, "__init__", spy)
    ours = evaluate_model(str(model_dir), str(synthetic_shards), batch_size=8, ray_min_images=10**9,
                          precision="bf16")
    assert ours["precision"] == "bf16" and seen == ["bf16"]
    assert evaluate_model(str(model_dir), str(synthetic_shards), batch_size=8, ray_min_images=10**9)[
        "precision"] == "fp32"  # the default, not the run's train.amp

    # The reference path, on a dataset taken for ImageNet-1k (its evaluation itself is stubbed: its predictor is
    # the one tested above).
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / "resnet18-f37072fd.pth")
    monkeypatch.setattr("pipeline.data.shards.read_manifest", lambda d: {**manifest, "num_classes": 1000})
    calls = []

    def fake_evaluate(meta, kwargs, *a, **kw) -> dict:  # noqa: ANN001, ANN002, ANN003
        calls.append(kwargs["precision"])
        return {"top1_err": 1.0, "top5_err": 0.5, "n_images": 16, "protocol": "p", "precision": kwargs["precision"]}

    monkeypatch.setattr(ev, "_evaluate", fake_evaluate)
    ref = evaluate_reference("resnet18", str(synthetic_shards), batch_size=8, precision="bf16",
                             eval_transform={"resize": 36, "crop": 32})
    assert calls == ["bf16"] and ref["precision"] == "bf16"
    rows = table_rows([{**ours, "arch": "resnet18", "torchvision_reference": ref}], {}, {})
    assert rows[0]["precision"] == rows[0]["torchvision_precision"] == "bf16"


def test_report_states_the_precision_and_flags_a_mix() -> None:
    from pipeline.report import precision_note

    row = {"arch": "resnet18", "precision": "fp32", "torchvision_top1_err": 30.0, "torchvision_precision": "fp32"}
    assert precision_note([row]) == "evaluated in fp32 (eval.precision), ours and the torchvision row alike"
    mixed = precision_note([row, {**row, "arch": "resnet50", "torchvision_precision": "bf16"}])
    assert "not comparable" in mixed and "resnet50 (torchvision weights): bf16" in mixed
    assert "not comparable" in precision_note([row, {"arch": "resnet50", "torchvision_top1_err": None}])
    assert "not recorded" in precision_note([{"arch": "resnet18"}])
    assert precision_note([{"arch": "resnet18", "precision": "fp32"}]) == "evaluated in fp32 (eval.precision)"
    bf16 = precision_note([{**row, "precision": "bf16", "torchvision_precision": "bf16"}])
    assert bf16.startswith("evaluated in bf16 (eval.precision), ours and the torchvision row alike")
    assert "published references are fp32" in bf16


def test_model_card_states_the_evaluation_precision() -> None:
    from pipeline.publish import model_card

    meta = {"eval_transform": {"resize": 36, "crop": 32}, "num_classes": 4, "config": {"train": {"amp": "bf16"}}}
    ev = {"top1_err": 10.0, "top5_err": 0.0, "n_images": 16, "num_classes": 4, "protocol": "1-crop",
          "precision": "fp32"}
    assert "protocol: 1-crop, precision: fp32 (eval.precision)." in model_card("resnet18", meta, ev, "synthetic")
