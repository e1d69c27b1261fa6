"""The minival split (held out of train by prepare, what tune selects on), the lr transfer rule between depths,
the trial batch, best.json -> training, and the report's lr provenance. No Ray here: tests/test_tuning.py runs
the searches."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.archs import lr_source_arch, network_kind
from pipeline.config import ParamsError, load_params
from pipeline.data.prepare import carve_minival, prepare_shards
from pipeline.data.shards import load_split_table, read_manifest, shard_files, verify_shards
from pipeline.data.sources import DataError, list_source
from pipeline.training.tuned import BEST_VERSION, tuned_lr_for
from pipeline.tuning import selection_split, trial_batch
from tests.conftest import MINIVAL_ARGS, MINIVAL_PER_CLASS, ImageTree

ROOT = Path(__file__).resolve().parent.parent


def _keys(shards: Path, split: str) -> list[str]:
    return load_split_table(shards, split).column("key").to_pylist()


def test_minival_is_carved_from_train_seeded_balanced_and_recorded(minival_shards: Path) -> None:
    m = read_manifest(minival_shards)
    mini, train = m["splits"]["minival"], m["splits"]["train"]
    n_classes, per_class = MINIVAL_ARGS["num_classes"], MINIVAL_ARGS["train_per_class"]
    # Recorded in the manifest: where it comes from, how it was drawn, which keys (digest), per-class counts.
    assert mini["carved_from"] == "train" and mini["per_class"] == MINIVAL_PER_CLASS and mini["seed"] == 0
    assert mini["n_images"] == n_classes * MINIVAL_PER_CLASS
    assert set(mini["class_counts"].values()) == {MINIVAL_PER_CLASS}
    assert set(train["class_counts"].values()) == {per_class - MINIVAL_PER_CLASS}
    assert m["options"]["minival_per_class"] == MINIVAL_PER_CLASS
    # Disjoint from train, together exactly the raw train split; its own shards under minival/.
    mk, tk = _keys(minival_shards, "minival"), _keys(minival_shards, "train")
    assert not set(mk) & set(tk) and len(set(mk)) == len(mk)
    assert len(mk) + len(tk) == n_classes * per_class and all(k.startswith("train/") for k in mk)
    assert all("/minival/" in f for f in shard_files(minival_shards, "minival"))
    assert not set(_keys(minival_shards, "val")) & set(mk)
    import hashlib

    assert mini["keys_sha256"] == hashlib.sha256("\n".join(sorted(mk)).encode()).hexdigest()
    # Every minival shard is in the manifest with its size and sha256: the full verification covers it.
    assert verify_shards(minival_shards) == []


def test_minival_draw_depends_on_its_seed_only(synthetic_tree: ImageTree) -> None:
    listing = list_source(synthetic_tree, "auto")
    a, b = carve_minival(listing, 2, 0), carve_minival(listing, 2, 0)
    assert a == b and len(a) == 2 * len(synthetic_tree.wnids)
    assert carve_minival(listing, 2, 1) != a
    assert carve_minival(listing, 0, 0) == frozenset()
    with pytest.raises(DataError, match=r"data\.minival_per_class=6 would hold out all"):
        carve_minival(listing, synthetic_tree.train_per_class, 0)


def test_prepare_with_and_without_minival(synthetic_tree: ImageTree, tmp_path: Path) -> None:
    none = prepare_shards(synthetic_tree, tmp_path / "a", rows_per_shard=8, workers=1, progress=False)
    assert none["splits"]["minival"]["n_images"] == 0 and none["splits"]["minival"]["shards"] == []
    assert none["splits"]["train"]["n_images"] == synthetic_tree.n_train
    with pytest.raises(ValueError, match=r"no minival split .*data\.minival_per_class >= 1.*never selects on the val"):
        selection_split(none, "X/manifest.json")
    two = prepare_shards(synthetic_tree, tmp_path / "b", rows_per_shard=8, workers=1, progress=False,
                         minival_per_class=2)
    assert two["fingerprint"] != none["fingerprint"]
    assert two["splits"]["train"]["n_images"] + two["splits"]["minival"]["n_images"] == synthetic_tree.n_train
    assert selection_split(two, "X")["n_images"] == 2 * len(synthetic_tree.wnids)
    # The same plan twice: byte-identical shards (minival included).
    again = prepare_shards(synthetic_tree, tmp_path / "c", rows_per_shard=8, workers=2, progress=False,
                           minival_per_class=2)
    assert again["splits"] == two["splits"]


def test_final_training_reads_the_full_train_set_by_default(minival_shards: Path) -> None:
    from pipeline.training.trainer import make_job, train_split_names

    m = read_manifest(minival_shards)
    p = load_params(ROOT / "params.yaml", [f"data.shards_dir={minival_shards}"])
    assert p.train.include_minival and train_split_names(p, m) == ("train", "minival")
    job = make_job(p, "resnet18", 0.1, 0, 1, None)
    assert job.n_train == MINIVAL_ARGS["num_classes"] * MINIVAL_ARGS["train_per_class"]
    assert set(job.train_files) == set(shard_files(minival_shards, "train") + shard_files(minival_shards, "minival"))
    assert job.val_files == shard_files(minival_shards, "val")
    off = load_params(ROOT / "params.yaml", [f"data.shards_dir={minival_shards}", "train.include_minival=false"])
    assert make_job(off, "resnet18", 0.1, 0, 1, None).n_train == m["splits"]["train"]["n_images"]
    # A tune trial: train minus minival, validated on minival, no val file in its job at all.
    trial = make_job(p, "resnet18", 0.1, 0, 1, None, train_splits=("train",), val_split="minival")
    assert trial.val_files == shard_files(minival_shards, "minival")
    assert trial.n_val == m["splits"]["minival"]["n_images"]
    assert not {f for f in trial.train_files + trial.val_files if "/val/" in f}


def test_transfer_rule_maps_each_depth_to_its_kind() -> None:
    tuned = ["resnet18", "resnet50"]
    assert network_kind("resnet34") == ("imagenet", "basic") and network_kind("resnet152") == ("imagenet", "bottleneck")
    assert {a: lr_source_arch(a, tuned) for a in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")} == {
        "resnet18": "resnet18", "resnet34": "resnet18", "resnet50": "resnet50", "resnet101": "resnet50",
        "resnet152": "resnet50"}
    # Nearest depth of the same kind; never another kind (a CIFAR net is not an ImageNet basic-block net).
    assert lr_source_arch("resnet152", ["resnet50", "resnet101"]) == "resnet101"
    assert lr_source_arch("resnet20", tuned) is None
    assert lr_source_arch("resnet50", ["resnet18", "resnet34"]) is None


def test_an_arch_of_an_untuned_kind_is_a_clear_params_error() -> None:
    with pytest.raises(ParamsError, match=r"tune\.archs \['resnet18'\] has no arch of the kind of \['resnet50', "
                                          r"'resnet101', 'resnet152'\] \(imagenet/bottleneck\)"):
        load_params(ROOT / "params.yaml", ["tune.archs=[resnet18]"])
    # With the params' own lr nothing needs tuning.
    assert load_params(ROOT / "params.yaml", ["tune.archs=[resnet18]", "train.use_tuned=false"])


@pytest.mark.parametrize("overrides, expected", [
    (["train.batch_size=256", "train.num_workers=8", "tune.workers_per_trial=1"], (32, 32)),
    (["train.batch_size=256", "train.num_workers=8", "tune.workers_per_trial=2"], (64, 32)),
    (["train.batch_size=256", "train.num_workers=8", "tune.workers_per_trial=0"], (32, 32)),
    (["train.batch_size=64", "train.num_workers=0", "tune.workers_per_trial=0"], (64, 64)),
])
def test_trials_use_the_final_runs_per_worker_batch(overrides: list[str], expected: tuple[int, int]) -> None:
    assert trial_batch(load_params(ROOT / "params.yaml", overrides)) == expected


def _best(tmp_path: Path, **extra: object) -> Path:
    best = {"version": BEST_VERSION, "selected_on": "minival", "selection_images": 16,
            "archs": {"resnet18": {"lr_per_256": 0.4, "lr": 0.05, "lr_warmup_epochs": 1, "trial_epochs": 2,
                                   "batch_size": 32, "selection_top1_err": 40.0},
                      "resnet50": {"lr_per_256": 1.6, "lr": 0.2, "lr_warmup_epochs": 0, "trial_epochs": 2,
                                   "batch_size": 32, "selection_top1_err": 50.0}},
            **extra}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    return path


def test_best_json_feeds_training_by_kind_with_the_linear_rule(tmp_path: Path) -> None:
    from pipeline.training.trainer import tuned_hparams

    best = _best(tmp_path)
    lr, warmup, src = tuned_lr_for(best, "resnet34", 256, 90)
    # 0.4 per 256 images at batch 256; warmup 1 of 2 trial epochs is the same share of 90 epochs.
    assert lr == pytest.approx(0.05 * 256 / 32) and warmup == 45 and src["tuned_lr_per_256"] == 0.4
    assert src["tuned_arch"] == "resnet18" and src["selected_on"] == "minival" and "transferred" in src["rule"]
    assert src["scaled"] == "linear rule x 256/32"
    lr, warmup, src = tuned_lr_for(best, "resnet50", 32, 1)
    assert (lr, warmup, src["rule"], src["scaled"]) == (0.2, 0, "own search", "no")
    p = load_params(ROOT / "params.yaml", ["train.batch_size=64"])
    assert tuned_hparams(p, best, "resnet152")[0] == pytest.approx(0.4)
    assert tuned_hparams(p, tmp_path / "absent.json", "resnet152")[2]["from"] == "params"
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"lr": 0.1, "lr_warmup_epochs": 0, "batch_size": 64}))
    with pytest.raises(ValueError, match=r"old\.json was written by an older tune stage"):
        tuned_lr_for(old, "resnet18", 64, 5)
    with pytest.raises(ValueError, match=r"none of the kind of resnet20"):
        tuned_lr_for(best, "resnet20", 64, 5)


def test_report_says_which_split_chose_each_lr(tmp_path: Path) -> None:
    from pipeline.report import render_markdown

    best = _best(tmp_path)
    trains = {}
    for arch in ("resnet18", "resnet34", "resnet50"):
        lr, _, src = tuned_lr_for(best, arch, 64, 5)
        trains[arch] = {"lr_source": src, "train_splits": ["train", "minival"], "n_train_images": 160}
    trains["resnet101"] = {"lr_source": {"from": "params", "why": "train.use_tuned is false", "lr": 0.1,
                                         "batch_size": 64}, "train_splits": ["train"], "n_train_images": 144}
    rows = [{"arch": a, "layers": i, "params_m": 1.0, "top1_err": 1.0, "top5_err": 1.0, "chance_top1_err": 75.0,
             "ref_source": None, "ref_key": None, "ref_top1_err": None, "ref_top5_err": None,
             "diff_top1_vs_ref": None, "diff_top5_vs_ref": None, "references": {},
             "torchvision_top1_err": None, "torchvision_top5_err": None, "torchvision_protocol": None,
             "epochs": 1, "train_time_s": 1.0, "images_per_s": 1.0, "protocol": "p"} for i, a in enumerate(trains)]
    md = render_markdown(rows, {"layout": "synthetic"}, [], {}, trains)
    lines = {a: next(line for line in md.splitlines() if line.startswith(f"- {a}:")) for a in trains}
    assert "resnet18's search (own search), selected on the **minival** split (16 train images held out" in lines[
        "resnet18"]
    assert "resnet18's search (transferred: same kind imagenet/basic" in lines["resnet34"]
    assert "resnet50's search (own search)" in lines["resnet50"] and "x 64/32" in lines["resnet50"]
    assert "from params (train.lr; train.use_tuned is false)" in lines["resnet101"]
    assert "train + minival (160 images, the full train set)" in lines["resnet18"]
    assert "train minus minival (train.include_minival: false)" in lines["resnet101"]
    assert "the val set above chose none of them" in md


def test_minival_shards_hold_no_val_or_train_row(minival_shards: Path) -> None:
    # Belt and braces on the bytes: the minival table is a strict subset of the raw train keys, labels intact.
    table: pa.Table = load_split_table(minival_shards, "minival")
    m = read_manifest(minival_shards)
    wnids = [c["wnid"] for c in m["classes"]]
    for key, label, wnid in zip(*(table.column(c).to_pylist() for c in ("key", "label", "wnid")), strict=True):
        assert key.startswith(f"train/{wnid}/") and wnids[label] == wnid


@pytest.mark.parametrize("include, expected", [
    (True, "trained on train + minival: the full train set (160 images)"),
    (False, "trained on train minus minival (144 images)"),
])
def test_model_card_says_what_the_model_trained_on(include: bool, expected: str) -> None:
    from pipeline.publish import model_card

    meta = {"eval_transform": {"resize": 36, "crop": 32}, "num_classes": 4, "data_fingerprint": "x" * 64,
            "config": {"train": {"epochs": 2, "include_minival": include}}, "epochs_trained": 2}
    ev = {"top1_err": 10.0, "top5_err": 0.0, "n_images": 16, "num_classes": 4, "data_fingerprint": "x" * 64}
    manifest = {"source": {"layout": "synthetic"}, "num_classes": 4, "fingerprint": "x" * 64,
                "splits": {"train": {"n_images": 144}, "minival": {"n_images": 16}, "val": {"n_images": 16}}}
    card = model_card("resnet18", meta, ev, "synthetic", manifest)
    assert expected in card and "the 16 minival images (held out of train by prepare) chose the learning rate" in card


def test_report_stage_files_carry_each_rows_lr_source(tmp_path: Path, minival_shards: Path) -> None:
    # build_report over the files the DAG writes (metrics/eval, metrics/train): the table's "lr (from)" column,
    # the provenance lines and the CSV's lr columns.
    import csv

    from pipeline.report import build_report

    best = _best(tmp_path)
    for d in ("eval", "train", "curves"):
        (tmp_path / d).mkdir()
    for arch in ("resnet18", "resnet34"):
        (tmp_path / "eval" / f"{arch}.json").write_text(json.dumps(
            {"arch": arch, "top1_err": 50.0, "top5_err": 0.0, "n_images": 16, "num_classes": 4, "protocol": "p"}))
        lr, _, src = tuned_lr_for(best, arch, 64, 2)
        (tmp_path / "train" / f"{arch}.json").write_text(json.dumps(
            {"epochs": 2, "train_time_s": 1.0, "images_per_s": 10.0, "lr_source": src,
             "train_splits": ["train", "minival"], "n_train_images": 160}))
    rows = build_report(tmp_path / "eval", tmp_path / "train", tmp_path / "curves", read_manifest(minival_shards),
                        tmp_path / "out")
    md = (tmp_path / "out" / "error_table.md").read_text()
    assert "| 0.1 (resnet18 @ minival) |" in md  # 0.05 at batch 32 -> 0.1 at 64, both rows
    assert "- resnet34: lr 0.1 at batch 64 from" in md and "transferred: same kind imagenet/basic" in md
    table = list(csv.DictReader((tmp_path / "out" / "error_table.csv").open()))
    assert [r["lr_selected_on"] for r in table] == ["minival", "minival"] and len(rows) == 2
