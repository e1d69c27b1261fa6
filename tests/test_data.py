"""pipeline.data: layouts, subsets, bad inputs, determinism, resume, verification, the synthetic set."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

import pipeline.data.prepare as prepare_mod
from pipeline.data.prepare import prepare_shards
from pipeline.data.shards import (
    ManifestError,
    ShardChecksumError,
    class_names,
    load_split_table,
    read_manifest,
    read_shard,
    shard_files,
    verify_shards,
)
from pipeline.data.sources import DataError, detect_source, list_source
from pipeline.data.synthetic import generate_synthetic_imagenet, synthetic_classes

if TYPE_CHECKING:  # fixtures come through pytest; importing conftest at run time would load it twice
    from tests.conftest import ImageTree

TINY_MAX_SIDE = 128  # == ImageTree.max_side of the tiny trees (asserted in _prepare)


def _prepare(tree: ImageTree, out: Path, **kw: Any) -> dict[str, Any]:
    assert tree.max_side == TINY_MAX_SIDE
    opts: dict[str, Any] = {"max_side": TINY_MAX_SIDE, "rows_per_shard": 8, "workers": 1, "progress": False}
    return prepare_shards(tree, out, **(opts | kw))


def _rows(out: Path, split: str) -> list[dict[str, Any]]:
    return load_split_table(out, split).to_pylist()


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _check_prepared(tree: ImageTree, out: Path, manifest: dict[str, Any]) -> None:
    """Counts, classes and labels of a prepared tree match what the fixture built."""
    assert detect_source(tree) == tree.layout
    assert manifest["source"]["layout"] == tree.layout
    assert manifest["num_classes"] == len(tree.wnids)
    assert [(c["index"], c["wnid"]) for c in manifest["classes"]] == list(enumerate(tree.wnids))
    assert class_names(manifest) == list(tree.names)
    for split, per_class in (("train", tree.train_per_class), ("val", tree.val_per_class)):
        entry = manifest["splits"][split]
        assert entry["n_images"] == per_class * len(tree.wnids)
        assert entry["class_counts"] == {w: per_class for w in tree.wnids}
        rows = _rows(out, split)
        assert len(rows) == entry["n_images"]
        assert all(r["label"] == tree.wnids.index(r["wnid"]) for r in rows)
        assert len({r["key"] for r in rows}) == len(rows)
        for r in rows:
            with Image.open(io.BytesIO(r["image"])) as img:
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (r["width"], r["height"]))
    assert verify_shards(out) == []
    assert (out / "rejected.csv").read_text() == "key,split,reason\n"


# ------------------------------------------------------------------------------------------------ layouts


def test_kaggle_layout_labels_follow_sorted_wnids(tiny_kaggle_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = _prepare(tiny_kaggle_tree, out)
    _check_prepared(tiny_kaggle_tree, out, manifest)
    # Val labels come from LOC_val_solution.csv: ILSVRC2012_val_00000001 is the LAST wnid (see the fixture).
    val = {r["key"]: r for r in _rows(out, "val")}
    assert val["ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"]["label"] == 4
    # Small RGB JPEGs keep their exact bytes; only the large one is re-encoded, to max_side on its long side.
    train = {r["key"]: r for r in _rows(out, "train")}
    (large,) = tiny_kaggle_tree.large_keys
    assert (train[large]["width"], train[large]["height"]) == (
        TINY_MAX_SIDE,
        round(TINY_MAX_SIDE * 200 / 300),
    )
    assert manifest["splits"]["train"]["n_reencoded"] == 1
    small = next(k for k in train if k != large)
    assert train[small]["image"] == (tiny_kaggle_tree.root / small).read_bytes()


def test_val_keeps_its_original_bytes_whatever_max_side(tiny_kaggle_tree: ImageTree, tmp_path: Path) -> None:
    """A reported error is measured on the val photos as published: data.max_side shrinks train and minival
    images only, never val's."""
    out = tmp_path / "shards"
    manifest = _prepare(tiny_kaggle_tree, out, max_side=32)  # smaller than every 60x45 image of the tree
    assert manifest["splits"]["train"]["n_reencoded"] == manifest["splits"]["train"]["n_images"]
    assert manifest["splits"]["val"]["n_reencoded"] == 0
    val = _rows(out, "val")
    assert len(val) == len(tiny_kaggle_tree.wnids) * tiny_kaggle_tree.val_per_class
    for r in val:
        assert r["image"] == (tiny_kaggle_tree.root / r["key"]).read_bytes()
        assert (r["width"], r["height"]) == (60, 45)


def test_full_imagenet_val_must_be_50000_in_1000_classes(
    tiny_kaggle_tree: ImageTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full ImageNet whose val split lost an image (here: a truncated file, rejected) is refused, naming the
    class; a subset or another layout is whatever the user gave. The tiny tree stands in for 1,000 x 50."""
    monkeypatch.setattr(prepare_mod, "IMAGENET_CLASSES", len(tiny_kaggle_tree.wnids))
    monkeypatch.setattr(prepare_mod, "IMAGENET_VAL_PER_CLASS", tiny_kaggle_tree.val_per_class)
    _prepare(tiny_kaggle_tree, tmp_path / "whole")  # complete: accepted
    victim = tiny_kaggle_tree.root / "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG"  # the last wnid's
    victim.write_bytes(victim.read_bytes()[:200])
    out = tmp_path / "short"
    with pytest.raises(DataError, match=rf"{tiny_kaggle_tree.wnids[-1]} has 1\b.*rejected\.csv"):
        _prepare(tiny_kaggle_tree, out, max_rejected=5)
    assert not (out / "manifest.json").exists()
    assert "ILSVRC2012_val_00000001" in (out / "rejected.csv").read_text()
    # The same counts from a layout that is not ImageNet's own, or from a class subset, pass.
    short = {w: tiny_kaggle_tree.val_per_class for w in tiny_kaggle_tree.wnids} | {tiny_kaggle_tree.wnids[0]: 1}
    prepare_mod.check_imagenet_val("imagefolder", short, "rejected.csv")
    prepare_mod.check_imagenet_val("kaggle", dict(list(short.items())[1:]), "rejected.csv")
    with pytest.raises(DataError, match="1 class"):
        prepare_mod.check_imagenet_val("ilsvrc_tar", short, "rejected.csv")


def test_folders_layout(tiny_folders_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _check_prepared(tiny_folders_tree, out, _prepare(tiny_folders_tree, out))


def test_imagefolder_layout_uses_folder_names(tiny_imagefolder_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = _prepare(tiny_imagefolder_tree, out)
    _check_prepared(tiny_imagefolder_tree, out, manifest)
    assert class_names(manifest) == ["apple", "cat", "dog"]


def test_imagefolder_without_val_is_a_clear_error(tiny_imagefolder_tree: ImageTree) -> None:
    shutil.rmtree(tiny_imagefolder_tree.root / "val")
    with pytest.raises(DataError, match=r"val/"):
        list_source(tiny_imagefolder_tree)


def test_ilsvrc_tars_read_without_extracting(tiny_ilsvrc_tars: ImageTree, tmp_path: Path) -> None:
    before = sorted(p.name for p in tiny_ilsvrc_tars.root.iterdir())
    out = tmp_path / "shards"
    manifest = _prepare(tiny_ilsvrc_tars, out)
    _check_prepared(tiny_ilsvrc_tars, out, manifest)
    assert sorted(p.name for p in tiny_ilsvrc_tars.root.iterdir()) == before  # nothing extracted
    val = {r["key"]: r["wnid"] for r in _rows(out, "val")}
    # The devkit's IDs are in reversed wnid order; the reader must map them to wnids, not use them as labels.
    assert val["ILSVRC2012_img_val.tar/ILSVRC2012_val_00000001.JPEG"] == tiny_ilsvrc_tars.wnids[-1]
    assert manifest["splits"]["train"]["n_reencoded"] == len(tiny_ilsvrc_tars.large_keys) == 1


def test_ilsvrc_tars_without_scipy_is_a_clear_error(
    tiny_ilsvrc_tars: ImageTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import ...` raise ImportError
    with pytest.raises(DataError, match="needs scipy"):
        list_source(tiny_ilsvrc_tars)


def test_missing_or_empty_raw_dir_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(f"not found: {tmp_path / 'nope'}")):
        detect_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape(f"empty: {tmp_path / 'empty'}")):
        prepare_shards(tmp_path / "empty", tmp_path / "out", progress=False)


def test_subsets(tiny_folders_tree: ImageTree, tmp_path: Path) -> None:
    w = tiny_folders_tree.wnids
    picked = list_source(tiny_folders_tree, classes=[w[3], w[1]])
    assert [(c.index, c.wnid) for c in picked.classes] == [(0, w[1]), (1, w[3])]
    first = list_source(tiny_folders_tree, first_n_classes=2)
    assert [c.wnid for c in first.classes] == list(w[:2])
    assert {s.wnid for s in first.samples} == set(w[:2])
    with pytest.raises(DataError, match="n09999999"):
        list_source(tiny_folders_tree, classes=["n09999999"])

    out = tmp_path / "capped"
    manifest = _prepare(tiny_folders_tree, out, first_n_classes=3, max_per_class=2)
    assert manifest["num_classes"] == 3
    assert manifest["splits"]["train"]["class_counts"] == dict.fromkeys(w[:3], 2)
    assert manifest["splits"]["val"]["class_counts"] == dict.fromkeys(w[:3], 2)  # the cap is train-only
    keys = sorted(r["key"] for r in _rows(out, "train") if r["wnid"] == w[0])
    assert keys == [f"train/{w[0]}/{w[0]}_{n}.JPEG" for n in (0, 1)]  # first N by sorted key


# --------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_converted_or_rejected_with_reasons(bad_images_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifest = _prepare(bad_images_tree, out, max_rejected=10)
    with (out / "rejected.csv").open(newline="") as fh:
        rejected = {row["key"]: row for row in csv.DictReader(fh)}
    assert set(rejected) == set(bad_images_tree.rejected)
    for key, reason in bad_images_tree.rejected.items():
        assert reason in rejected[key]["reason"], (key, rejected[key]["reason"])
        assert rejected[key]["split"] == "train"
    assert manifest["rejected"] == len(bad_images_tree.rejected)

    rows = {r["key"]: r for r in _rows(out, "train")}
    assert len(rows) == 11 and manifest["splits"]["val"]["n_images"] == 2
    for key in bad_images_tree.converted_keys:
        with Image.open(io.BytesIO(rows[key]["image"])) as img:
            assert (img.format, img.mode) == ("JPEG", "RGB"), key
            img.load()
    assert manifest["splits"]["train"]["n_reencoded"] == len(bad_images_tree.converted_keys)
    (large,) = bad_images_tree.large_keys
    with Image.open(bad_images_tree.root / large) as original:
        assert max(original.size) > TINY_MAX_SIDE
    assert max(rows[large]["width"], rows[large]["height"]) == TINY_MAX_SIDE
    progressive = next(k for k in rows if k.endswith("_progressive.JPEG"))
    assert rows[progressive]["image"] == (bad_images_tree.root / progressive).read_bytes()


def test_too_many_rejections_fail_but_list_the_reasons(bad_images_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    n_bad = len(bad_images_tree.rejected)
    with pytest.raises(DataError, match=rf"{n_bad} of \d+ inputs .* rejected.*max_rejected=0.01"):
        _prepare(bad_images_tree, out, max_rejected=0.01)
    assert not (out / "manifest.json").exists()
    assert len((out / "rejected.csv").read_text().splitlines()) == 1 + n_bad
    with pytest.raises(DataError, match="max_rejected=5"):
        _prepare(bad_images_tree, out, max_rejected=n_bad - 1)  # a count when >= 1
    # Raising the limit reuses the shards already written (max_rejected does not change the plan).
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")}
    manifest = _prepare(bad_images_tree, out, max_rejected=n_bad)
    assert manifest["rejected"] == n_bad
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")} == mtimes


# ------------------------------------------------------------------------------- determinism and resume


def test_output_identical_for_one_and_two_workers(tiny_kaggle_tree: ImageTree, tmp_path: Path) -> None:
    one = _prepare(tiny_kaggle_tree, tmp_path / "w1", rows_per_shard=6, workers=1)
    two = _prepare(tiny_kaggle_tree, tmp_path / "w2", rows_per_shard=6, workers=2)
    assert one == two
    assert (tmp_path / "w1" / "manifest.json").read_bytes() == (
        tmp_path / "w2" / "manifest.json"
    ).read_bytes()
    for split in ("train", "val"):
        a = [Path(p).read_bytes() for p in shard_files(tmp_path / "w1", split)]
        b = [Path(p).read_bytes() for p in shard_files(tmp_path / "w2", split)]
        assert a == b
    # Shuffled before sharding: every train shard mixes classes.
    assert len(one["splits"]["train"]["shards"]) == 4
    for path in shard_files(tmp_path / "w1", "train"):
        assert len({r["wnid"] for r in _rows_of(path)}) > 1


def _rows_of(path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def test_killed_prepare_resumes_and_rewrites_only_missing_shards(
    tiny_kaggle_tree: ImageTree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _prepare(tiny_kaggle_tree, tmp_path / "reference", rows_per_shard=5)
    out = tmp_path / "shards"
    real_build = prepare_mod.build_shard

    def dies_on_train_shard_2(task: prepare_mod.ShardTask, *args: Any) -> prepare_mod.ShardResult:
        if task.path == "train/00002.parquet":
            raise RuntimeError("simulated kill")
        return real_build(task, *args)

    monkeypatch.setattr(prepare_mod, "build_shard", dies_on_train_shard_2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        _prepare(tiny_kaggle_tree, out, rows_per_shard=5)
    assert not (out / "manifest.json").exists()
    survivors = {p: p.stat().st_mtime_ns for p in out.glob("train/*.parquet")}
    assert sorted(p.name for p in survivors) == ["00000.parquet", "00001.parquet"]

    monkeypatch.setattr(prepare_mod, "build_shard", real_build)
    assert _prepare(tiny_kaggle_tree, out, rows_per_shard=5) == reference
    assert all(p.stat().st_mtime_ns == t for p, t in survivors.items())  # not rewritten

    # A finished run that loses one shard and its manifest: only that shard is written again.
    (out / "train" / "00001.parquet").unlink()
    (out / "manifest.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")}
    assert _prepare(tiny_kaggle_tree, out, rows_per_shard=5) == reference
    after = {p: p.stat().st_mtime_ns for p in out.glob("*/*.parquet")}
    assert set(after) - set(before) == {out / "train" / "00001.parquet"}
    assert all(after[p] == t for p, t in before.items())
    assert verify_shards(out) == []


def test_a_different_plan_starts_over_cleanly(tiny_kaggle_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _prepare(tiny_kaggle_tree, out, rows_per_shard=3)
    assert len(list(out.glob("train/*.parquet"))) == 7
    manifest = _prepare(tiny_kaggle_tree, out, rows_per_shard=10)
    assert len(list(out.glob("train/*.parquet"))) == 2 == len(manifest["splits"]["train"]["shards"])
    assert verify_shards(out) == []
    assert json.loads((out / ".plan.json").read_text())["fingerprint"] == manifest["fingerprint"]


# ---------------------------------------------------------------------------------------------- readers


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_start_up_checks_are_cheap_and_every_read_hashes(tiny_kaggle_tree: ImageTree, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    _prepare(tiny_kaggle_tree, out)
    shard = out / "train" / "00001.parquet"
    _flip_byte(shard, shard.stat().st_size // 2)  # inside the image column: sizes and footer still fine
    assert verify_shards(out) == ["train/00001.parquet: sha256 differs from the manifest"]
    # Start-up reads sizes and footers only: the flipped image byte is not its business ...
    assert len(shard_files(out, "train")) == 3
    # ... the read that touches the shard is: it hashes the bytes it fetched and names the shard.
    with pytest.raises(ShardChecksumError, match=re.escape(f"shard {shard.resolve()} has sha256")):
        load_split_table(out, "train")
    with pytest.raises(ShardChecksumError, match=re.escape(str(shard.resolve()))):
        read_shard(str(shard.resolve()), columns=["label"])
    read_shard(str((out / "train" / "00000.parquet").resolve()))  # the others still read

    (out / "train" / "stray.parquet").write_bytes(b"x")
    assert any("stray.parquet" in p for p in verify_shards(out))
    (out / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=re.escape(str(out.resolve() / "manifest.json"))):
        read_manifest(out)
    assert "no shard manifest" in verify_shards(out)[0]


def test_start_up_refuses_wrong_sizes_and_footers_of_the_files_it_reads(
    tiny_kaggle_tree: ImageTree, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    _prepare(tiny_kaggle_tree, out)
    last = out / "train" / "00002.parquet"
    last.write_bytes(last.read_bytes()[:-1])  # truncated: a half-copied shard
    with pytest.raises(ShardChecksumError, match=re.escape(f"shard {last.resolve()} has ")):
        shard_files(out, "train")
    # A run that reads only the first shards checks only those (train.fraction / tune.train_fraction).
    assert shard_files(out, "train", limit=2) == [str(out.resolve() / f"train/0000{i}.parquet") for i in (0, 1)]
    first = out / "train" / "00000.parquet"
    _flip_byte(first, first.stat().st_size - 2)  # the footer's "PAR1" magic: same size, no footer
    with pytest.raises(ShardChecksumError, match=re.escape(f"shard {first.resolve()} has no readable Parquet footer")):
        shard_files(out, "train", limit=1)
    (out / "train" / "00001.parquet").unlink()
    with pytest.raises(ShardChecksumError, match=r"train/00001.parquet listed in .* is missing"):
        shard_files(out, "train", verify=True)
    assert len(shard_files(out, "train", verify=False)) == 3


def test_a_manifest_without_shard_sizes_asks_for_prepare(synthetic_shards: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(synthetic_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["nbytes"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="older prepare"):
        shard_files(old, "val")


def test_shared_synthetic_shards_fixture(synthetic_shards: Path) -> None:
    manifest = read_manifest(synthetic_shards)
    assert manifest["num_classes"] == 4 and manifest["splits"]["train"]["n_images"] == 64
    assert verify_shards(synthetic_shards) == []


# ------------------------------------------------------------------------------------------ synthetic set


def test_synthetic_set_is_deterministic_and_detected(synthetic_tree: ImageTree, tmp_path: Path) -> None:
    args = dict(synthetic_tree.generator_args)
    again = tmp_path / "again"
    generate_synthetic_imagenet(again, **(args | {"workers": 2}))
    assert _tree_digest(again) == _tree_digest(synthetic_tree.root)
    other_seed = tmp_path / "other"
    generate_synthetic_imagenet(other_seed, **(args | {"seed": 1}))
    assert _tree_digest(other_seed) != _tree_digest(synthetic_tree.root)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp trees left

    assert detect_source(synthetic_tree) == "synthetic"
    assert "SYNTHETIC" in (synthetic_tree.root / "SYNTHETIC_README.txt").read_text()
    header = (synthetic_tree.root / "LOC_val_solution.csv").read_text().splitlines()[0]
    assert header == "ImageId,PredictionString"
    assert list_source(synthetic_tree, "kaggle").classes == list_source(synthetic_tree).classes
    out = tmp_path / "shards"
    _check_prepared(synthetic_tree, out, _prepare(synthetic_tree, out))


def test_synthetic_classes_differ_in_two_attributes() -> None:
    classes = synthetic_classes(50)
    assert [c.wnid for c in classes] == sorted(c.wnid for c in classes)
    for i, a in enumerate(classes):
        for b in classes[:i]:
            assert (a.shape != b.shape) + (a.colour != b.colour) + (a.texture != b.texture) >= 2
    assert len({(c.shape, c.colour, c.texture, c.outlined) for c in synthetic_classes(1000)}) == 1000
    assert all(c.name.startswith("synthetic ") for c in classes)


def test_synthetic_refuses_to_replace_other_data(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "photo.jpg").write_bytes(b"keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        generate_synthetic_imagenet(
            tmp_path / "precious", num_classes=2, train_per_class=1, val_per_class=1, image_size=16, seed=0
        )
    assert (tmp_path / "precious" / "photo.jpg").read_bytes() == b"keep me"


# ------------------------------------------------------------------------- never destroy another dataset


def test_another_datasets_shards_are_never_replaced_by_accident(
    tiny_kaggle_tree: ImageTree, tiny_imagefolder_tree: ImageTree, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    kept = _prepare(tiny_kaggle_tree, out)
    before = _tree_digest(out)
    with pytest.raises(DataError) as err:
        _prepare(tiny_imagefolder_tree, out)
    message = str(err.value)
    # Both datasets named, and how to replace on purpose.
    assert os.fspath(tiny_kaggle_tree) in message and os.fspath(tiny_imagefolder_tree) in message
    assert "--replace" in message and "kaggle" in message and "imagefolder" in message
    assert _tree_digest(out) == before  # not a byte changed
    assert read_manifest(out) == kept
    # On purpose: replaced.
    other = _prepare(tiny_imagefolder_tree, out, replace=True)
    assert read_manifest(out) == other and other["source"]["layout"] == "imagefolder"
    # The same raw dataset with other options is the user's own data: it starts over (see the test above).
    _prepare(tiny_imagefolder_tree, out, rows_per_shard=3)


def test_an_interrupted_prepare_of_another_dataset_may_be_replaced(
    tiny_kaggle_tree: ImageTree, tiny_imagefolder_tree: ImageTree, tmp_path: Path
) -> None:
    out = tmp_path / "shards"
    _prepare(tiny_kaggle_tree, out)
    (out / "manifest.json").unlink()  # no complete dataset any more: only leftovers
    assert _prepare(tiny_imagefolder_tree, out)["source"]["layout"] == "imagefolder"


def test_command_line_datasets_get_a_shards_folder_of_their_own(tmp_path: Path) -> None:
    from pipeline.data.prepare import dataset_shards_dir

    flowers = dataset_shards_dir("data/shards", tmp_path / "flowers")
    assert flowers.startswith("data/shards-flowers-") and flowers != "data/shards"
    assert dataset_shards_dir("data/shards", tmp_path / "flowers") == flowers  # resumable: same folder again
    assert dataset_shards_dir("data/shards", tmp_path / "other" / "flowers") != flowers
    assert dataset_shards_dir("s3://bucket/shards/", "s3://bucket/raw/flowers").startswith("s3://bucket/shards-flowers-")
