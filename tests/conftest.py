"""Shared fixtures: tiny raw datasets of REAL JPEG files, in every layout prepare reads, built in tmp_path.

Every tree fixture returns an `ImageTree`, which is `os.PathLike` (pass it straight as `raw_dir`) and says
what it holds: sorted `wnids` (label i is `wnids[i]`), `names`, images per class, and for the bad-input tree
which keys must be converted and which rejected. Nothing is downloaded.

    def test_something(tiny_kaggle_tree, tmp_path):
        manifest = prepare_shards(tiny_kaggle_tree, tmp_path / "shards", max_side=tiny_kaggle_tree.max_side)
        assert manifest["splits"]["train"]["n_images"] == tiny_kaggle_tree.n_train

`synthetic_shards` (session-scoped) is a ready, prepared shards folder for stage/training tests: treat it as
read-only.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import pipeline.data.sources as sources
from tests import ray_session

# One auth mode for every Ray this test process starts or joins. Ray 2.60 turns token auth on for a new local
# `ray.init()` cluster when RAY_AUTH_MODE is unset, and a driver keeps the mode it first saw: a later test that
# sets RAY_AUTH_MODE=disabled (to join the no-auth 2-node clusters) then starts GCS processes that want a token
# its driver never sends ("Failed to start GCS ... InvalidAuthToken"). Token auth itself is tested against a real
# head in tests/test_cluster.py, in its subprocesses' own environments.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The first five ImageNet-1k synsets, deliberately out of order here: labels must follow SORTED wnids.
TINY_CLASSES: dict[str, str] = {
    "n01491361": "tiger shark, Galeocerdo cuvieri",
    "n01440764": "tench, Tinca tinca",
    "n01494475": "hammerhead, hammerhead shark",
    "n01443537": "goldfish, Carassius auratus",
    "n01484850": "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
}
TINY_TRAIN_PER_CLASS = 4
TINY_VAL_PER_CLASS = 2
TINY_SIZE = (60, 45)  # (width, height) of an ordinary tiny image
TINY_MAX_SIDE = 128  # use as max_side: every tiny image fits, the one large image gets re-encoded
LARGE_SIZE = (300, 200)  # the one image per tree that is larger than TINY_MAX_SIDE


@dataclass(frozen=True)
class ImageTree:
    """A raw dataset built by a fixture; `os.fspath(tree)` is its root folder."""

    root: Path
    layout: str  # what detect_source must answer
    wnids: tuple[str, ...]  # sorted; label i <-> wnids[i]
    names: tuple[str, ...]  # by label
    train_per_class: int
    val_per_class: int
    large_keys: tuple[str, ...] = ()  # keys of images larger than TINY_MAX_SIDE (re-encoded by prepare)
    converted_keys: tuple[str, ...] = ()  # bad_images_tree: inputs that must come out as RGB JPEG
    rejected: Mapping[str, str] = field(default_factory=dict)  # bad_images_tree: key -> reason substring
    max_side: int = TINY_MAX_SIDE  # pass as max_side: small images fit, `large_keys` get re-encoded
    generator_args: Mapping[str, int] = field(default_factory=dict)  # synthetic_tree: how it was generated

    def __fspath__(self) -> str:
        return str(self.root)

    @property
    def n_train(self) -> int:
        return self.train_per_class * len(self.wnids)

    @property
    def n_val(self) -> int:
        return self.val_per_class * len(self.wnids)


def jpeg_bytes(
    size: tuple[int, int], seed: int, *, mode: str = "RGB", fmt: str = "JPEG", **save: object
) -> bytes:
    """A small photo-like image (smooth colour field + noise) encoded as `fmt`; deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    w, h = size
    coarse = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(img, np.float32) + rng.normal(0, 10, (h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | save)
    return buf.getvalue()


def write_image(path: Path, size: tuple[int, int] = TINY_SIZE, seed: int = 0, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(size, seed, **kw))  # type: ignore[arg-type]
    return path


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    """`make_jpeg(path, size=(60, 45), seed=0, mode="RGB", fmt="JPEG", **save_kwargs)` writes a real image."""
    return write_image


def _sorted_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    wnids = tuple(sorted(TINY_CLASSES))
    return wnids, tuple(TINY_CLASSES[w] for w in wnids)


def _val_layout(wnids: tuple[str, ...]) -> list[tuple[str, str]]:
    """(ILSVRC2012_val_XXXXXXXX, wnid) pairs with the classes interleaved, as in ImageNet's val numbering."""
    pairs = [(w, j) for j in range(TINY_VAL_PER_CLASS) for w in reversed(wnids)]
    return [(f"ILSVRC2012_val_{i + 1:08d}", w) for i, (w, _) in enumerate(pairs)]


@pytest.fixture
def tiny_kaggle_tree(tmp_path: Path) -> ImageTree:
    """Kaggle's ImageNet layout: ILSVRC/Data/CLS-LOC/{train/<wnid>/, flat val/}, LOC_val_solution.csv and
    LOC_synset_mapping.txt at the root. 5 classes x 4 train + 2 val JPEGs of 60x45; the first train image of
    the first class is 300x200 (larger than TINY_MAX_SIDE)."""
    root = tmp_path / "kaggle"
    base = root / "ILSVRC" / "Data" / "CLS-LOC"
    wnids, names = _sorted_classes()
    large = []
    for c, wnid in enumerate(wnids):
        for n in range(TINY_TRAIN_PER_CLASS):
            size = LARGE_SIZE if (c, n) == (0, 0) else TINY_SIZE
            path = write_image(base / "train" / wnid / f"{wnid}_{n}.JPEG", size, seed=100 * c + n)
            if size == LARGE_SIZE:
                large.append(path.relative_to(root).as_posix())
    with (root / "LOC_val_solution.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ImageId", "PredictionString"])
        for i, (image_id, wnid) in enumerate(_val_layout(wnids)):
            write_image(base / "val" / f"{image_id}.JPEG", TINY_SIZE, seed=10_000 + i)
            writer.writerow([image_id, f"{wnid} 1 2 40 30 {wnid} 5 5 20 20 "])
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {TINY_CLASSES[w]}\n" for w in wnids))
    return ImageTree(root, "kaggle", wnids, names, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS, tuple(large))


@pytest.fixture
def tiny_folders_tree(tmp_path: Path) -> ImageTree:
    """An extracted ImageNet: train/<wnid>/ and val/<wnid>/ (val already sorted into class folders), with
    Caffe's synset_words.txt for the names. 5 classes x 4 train + 2 val; one 300x200 train image."""
    root = tmp_path / "folders"
    wnids, names = _sorted_classes()
    large = []
    for c, wnid in enumerate(wnids):
        for n in range(TINY_TRAIN_PER_CLASS):
            size = LARGE_SIZE if (c, n) == (1, 0) else TINY_SIZE
            path = write_image(root / "train" / wnid / f"{wnid}_{n}.JPEG", size, seed=200 * c + n)
            if size == LARGE_SIZE:
                large.append(path.relative_to(root).as_posix())
        for n in range(TINY_VAL_PER_CLASS):
            write_image(
                root / "val" / wnid / f"ILSVRC2012_val_{10 * c + n + 1:08d}.JPEG", seed=20_000 + 10 * c + n
            )
    (root / "synset_words.txt").write_text("".join(f"{w} {TINY_CLASSES[w]}\n" for w in wnids))
    return ImageTree(root, "folders", wnids, names, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS, tuple(large))


@pytest.fixture
def tiny_imagefolder_tree(tmp_path: Path) -> ImageTree:
    """The user's own classes, torchvision-ImageFolder style: train/<class>/ + val/<class>/ with class names
    `dog`, `apple`, `cat` (labels follow sorted names: apple=0, cat=1, dog=2); 4 train + 2 val .jpg each."""
    root = tmp_path / "imagefolder"
    classes = ("dog", "apple", "cat")
    for c, name in enumerate(classes):
        for n in range(TINY_TRAIN_PER_CLASS):
            write_image(root / "train" / name / f"img{n}.jpg", seed=300 * c + n)
        for n in range(TINY_VAL_PER_CLASS):
            write_image(root / "val" / name / f"held_out_{n}.jpg", seed=30_000 + 10 * c + n)
    wnids = tuple(sorted(classes))
    return ImageTree(root, "imagefolder", wnids, wnids, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS)


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def tiny_ilsvrc_tars(tmp_path: Path) -> ImageTree:
    """A miniature of the three official files: ILSVRC2012_img_train.tar (a tar of per-class <wnid>.tar),
    ILSVRC2012_img_val.tar (flat) and ILSVRC2012_devkit_t12.tar.gz (data/meta.mat written with scipy,
    data/ILSVRC2012_validation_ground_truth.txt). ILSVRC2012_IDs are assigned in NON-sorted wnid order and
    meta.mat also holds a non-leaf synset, as the real one does. Skips when scipy is missing."""
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "ilsvrc"
    root.mkdir()
    wnids, names = _sorted_classes()
    large = []
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, wnid in enumerate(wnids):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for n in range(TINY_TRAIN_PER_CLASS):
                    size = LARGE_SIZE if (c, n) == (2, 1) else TINY_SIZE
                    _add_bytes(inner, f"{wnid}_{n}.JPEG", jpeg_bytes(size, 400 * c + n))
                    if size == LARGE_SIZE:
                        large.append(f"ILSVRC2012_img_train.tar/{wnid}.tar/{wnid}_{n}.JPEG")
            _add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())
    # The devkit numbers classes in its own order (ID 1 is not the smallest wnid): use reversed order.
    ilsvrc_id = {w: i + 1 for i, w in enumerate(reversed(wnids))}
    truth = []
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tf:
        for i, (image_id, wnid) in enumerate(_val_layout(wnids)):
            _add_bytes(tf, f"{image_id}.JPEG", jpeg_bytes(TINY_SIZE, 40_000 + i))
            truth.append(ilsvrc_id[wnid])
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(wnids) + 1, 1), dtype=dtype)
    for i, wnid in enumerate(wnids):
        synsets[i, 0] = (ilsvrc_id[wnid], wnid, TINY_CLASSES[wnid], 0)
    synsets[len(wnids), 0] = (len(wnids) + 1, "n01440000", "fish (an ancestor, not a class)", 2)
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": synsets})
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tf:
        _add_bytes(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        truth_text = "".join(f"{t}\n" for t in truth).encode()
        _add_bytes(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth_text)
    return ImageTree(root, "ilsvrc_tar", wnids, names, TINY_TRAIN_PER_CLASS, TINY_VAL_PER_CLASS, tuple(large))


def _emulate_permission_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sources' file and folder readers honour `chmod 000` even for root.

    Tests run as root, and root reads any file whatever its mode, so `chmod 000` alone cannot produce the
    PermissionError a normal user gets. We wrap the two functions every read goes through
    (`sources.read_file_bytes`, `sources.scan_dir`) to raise EACCES when no read bit is set. The patch lives
    in this process only: use workers=1 with bad_images_tree when running as root.
    """
    original_read, original_scan = sources.read_file_bytes, sources.scan_dir

    def unreadable(path: str | os.PathLike[str]) -> bool:
        return os.stat(path).st_mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH) == 0

    def read_file_bytes(path: str) -> bytes:
        if unreadable(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return original_read(path)

    def scan_dir(path: str | Path) -> list[os.DirEntry[str]]:
        if unreadable(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return original_scan(path)

    monkeypatch.setattr(sources, "read_file_bytes", read_file_bytes)
    monkeypatch.setattr(sources, "scan_dir", scan_dir)


@pytest.fixture
def bad_images_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageTree]:
    """A folders tree (2 classes) mixing good images with every awkward input prepare must handle.

    Converted to RGB JPEG (`converted_keys`): a CMYK JPEG, a greyscale JPEG, PNG bytes named .JPEG (RGBA),
    a 300x200 JPEG (re-encoded to TINY_MAX_SIDE). Kept as they are: baseline and progressive
    RGB JPEGs. Rejected (`rejected`, key -> reason substring): a truncated JPEG, a zero-byte .JPEG, a text
    file named .JPEG, an unreadable (chmod 000) .JPEG, an unreadable folder, and a file lying directly in
    train/. As root, unreadability is emulated (see `_emulate_permission_bits`): run prepare with workers=1.
    `train_per_class`/`val_per_class` do not apply here; the good counts are 8 + 3 train, 1 + 1 val.
    """
    root = tmp_path / "bad"
    a, b = "n01440764", "n01443537"
    ta, tb = root / "train" / a, root / "train" / b
    for n in range(3):
        write_image(ta / f"{a}_good{n}.JPEG", seed=500 + n)
        write_image(tb / f"{b}_good{n}.JPEG", seed=600 + n)
    write_image(ta / f"{a}_progressive.JPEG", seed=510, progressive=True)
    write_image(root / "val" / a / "ILSVRC2012_val_00000001.JPEG", seed=520)
    write_image(root / "val" / b / "ILSVRC2012_val_00000002.JPEG", seed=521)
    converted = {
        f"{a}_cmyk.JPEG": {"mode": "CMYK"},
        f"{a}_gray.JPEG": {"mode": "L"},
        f"{a}_png.JPEG": {"mode": "RGBA", "fmt": "PNG"},
        f"{a}_large.JPEG": {"size": LARGE_SIZE},
    }
    for i, (name, kw) in enumerate(converted.items()):
        write_image(ta / name, seed=530 + i, **kw)
    whole = jpeg_bytes(TINY_SIZE, 540)
    (ta / f"{a}_truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (ta / f"{a}_empty.JPEG").write_bytes(b"")
    (ta / f"{a}_text.JPEG").write_text("this is not an image\n")
    locked_file = write_image(ta / f"{a}_locked.JPEG", seed=550)
    locked_dir = ta / "locked_dir"
    write_image(locked_dir / f"{a}_hidden_inside.JPEG", seed=551)
    (root / "train" / "README.txt").write_text("a stray file outside the class folders\n")
    os.chmod(locked_file, 0)
    os.chmod(locked_dir, 0)
    if os.geteuid() == 0:
        _emulate_permission_bits(monkeypatch)
    rel = f"train/{a}"
    yield ImageTree(
        root,
        "folders",
        (a, b),
        (a, b),
        train_per_class=0,
        val_per_class=0,
        large_keys=(f"{rel}/{a}_large.JPEG",),
        converted_keys=tuple(f"{rel}/{name}" for name in converted),
        rejected={
            f"{rel}/{a}_truncated.JPEG": "truncated",
            f"{rel}/{a}_empty.JPEG": "empty file",
            f"{rel}/{a}_text.JPEG": "not an image",
            f"{rel}/{a}_locked.JPEG": "permission denied",
            f"{rel}/locked_dir/": "unreadable folder",
            "train/README.txt": "not inside a class folder",
        },
    )
    os.chmod(locked_file, 0o644)  # let tmp_path cleanup delete them as a normal user too
    os.chmod(locked_dir, 0o755)


SYNTHETIC_ARGS = {"num_classes": 4, "train_per_class": 6, "val_per_class": 3, "image_size": 32, "seed": 0}


@pytest.fixture
def synthetic_tree(tmp_path: Path) -> ImageTree:
    """A tiny generated synthetic set (SYNTHETIC_ARGS: 4 classes x 6 train + 3 val, 32 px), Kaggle layout
    at the root (train/, flat val/, LOC_*.{csv,txt}, SYNTHETIC_README.txt)."""
    from pipeline.data.synthetic import generate_synthetic_imagenet, synthetic_classes

    root = tmp_path / "synthetic"
    generate_synthetic_imagenet(root, **SYNTHETIC_ARGS)
    classes = synthetic_classes(SYNTHETIC_ARGS["num_classes"])
    return ImageTree(
        root,
        "synthetic",
        tuple(c.wnid for c in classes),
        tuple(c.name for c in classes),
        SYNTHETIC_ARGS["train_per_class"],
        SYNTHETIC_ARGS["val_per_class"],
        generator_args=dict(SYNTHETIC_ARGS),
    )


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared shards (manifest.json, train/ + val/ Parquet) of a synthetic set of 4 classes x 16 train +
    4 val images of 40 px, 16 rows per shard; built once per session. READ-ONLY: copy it to modify it."""
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.synthetic import generate_synthetic_imagenet

    base = tmp_path_factory.mktemp("synthetic_shards")
    generate_synthetic_imagenet(
        base / "raw", num_classes=4, train_per_class=16, val_per_class=4, image_size=40, seed=0
    )
    prepare_shards(base / "raw", base / "shards", max_side=64, rows_per_shard=16, workers=1, progress=False)
    return base / "shards"


MINIVAL_ARGS = {"num_classes": 4, "train_per_class": 40, "val_per_class": 4, "image_size": 32, "seed": 0}
MINIVAL_PER_CLASS = 4


@pytest.fixture(scope="session")
def minival_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared shards with a minival split: MINIVAL_ARGS (4 classes x 40 train + 4 val, 32 px), of which
    MINIVAL_PER_CLASS train images per class are held out as minival; 16 rows per shard. READ-ONLY."""
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.synthetic import generate_synthetic_imagenet

    base = tmp_path_factory.mktemp("minival_shards")
    generate_synthetic_imagenet(base / "raw", **MINIVAL_ARGS)
    prepare_shards(base / "raw", base / "shards", max_side=64, rows_per_shard=16, workers=1, progress=False,
                   minival_per_class=MINIVAL_PER_CLASS, minival_seed=0)
    return base / "shards"


# --- a copy of the repository with its own params (end-to-end and cluster tests) ------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def copy_repo(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files, as a fresh clone would have them (no .git)."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def set_param(tree: dict, dotted: str, value: object) -> None:
    """`set_param(params, "train.epochs", 2)` on a params.yaml tree (the section must exist)."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def write_params(repo: Path, overrides: Mapping[str, object]) -> dict:
    """Rewrite `repo`/params.yaml (a copy: see copy_repo) with dotted-key overrides; returns the new tree."""
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in overrides.items():
        set_param(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def wait_for_http(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 60) -> None:
    """Poll `url` until it answers; fail naming `what` if `proc` exits first or `timeout_s` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.2)


# --- test tiers ------------------------------------------------------------------------------------------------
# `make test-fast` (PIPELINE_TEST_TIER=fast) runs the tests without the markers below. So that a test which starts
# Ray, a server or a CLI cannot slip into the fast tier unmarked, every new process started through `subprocess`
# (Ray's raylet and GCS, `mlflow server`, moto, dvc, our CLIs) fails the test there, naming the marker to add.
FAST_TIER_EXCLUDES = ("slow", "ray", "e2e", "server", "subprocess", "heavy")
# Short-lived queries the library itself makes (`git rev-parse HEAD` for lineage, `uname -p` in platform info)
# and the C compiler building the ROI decoder; `ldconfig -p` is ctypes.util.find_library, run when torch loads.
ALLOWED_IN_FAST_TIER = ("git", "uname", "cc", "gcc", "ldconfig")
# Fixtures that start a server: a test using one is marked `server` without saying so itself.
SERVER_FIXTURES = ("server", "registered", "s3_endpoint")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(getattr(item, "fixturenames", ())) & set(SERVER_FIXTURES):
            item.add_marker(pytest.mark.server)
    if (os.environ.get("PIPELINE_TEST_TIER") != "fast" and os.environ.get(OWN_RAY_ENV) != "1"
            and any(item.get_closest_marker("ray") for item in items)):
        _share_one_ray()


# --- one Ray cluster per session, and a count of them (tests/ray_session.py) -----------------------------------
# Every `ray.init()` that would start a local Ray joins one shared head + worker node instead; a test whose claim
# is about a Ray of its own (its size, its auth, its nodes) is marked `own_ray`. PIPELINE_TEST_OWN_RAY=1 turns the
# sharing off (each test starts its own, as before), to compare. The summary line `ray clusters started: N`
# counts every GCS server the session's processes started, subprocesses (dvc, stages, `ray start`) included.
OWN_RAY_ENV = "PIPELINE_TEST_OWN_RAY"
os.environ.setdefault(ray_session.RUN_MARKER, uuid.uuid4().hex)
_SHARED_RAY = ray_session.SharedCluster(dict(os.environ))
_COUNTER = ray_session.ClusterCounter(os.environ[ray_session.RUN_MARKER])
_CURRENT: list[pytest.Item] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_ray: starts a local Ray of its own instead of joining the session's "
                                       "shared cluster (its claim depends on that Ray's size or kind)")
    if os.environ.get("PIPELINE_TEST_TIER") != "fast":
        _COUNTER.start()


def _share_one_ray() -> None:
    import ray

    if not getattr(ray.init, "joins_shared_cluster", False):  # (Ray's own init has a __wrapped__)
        opted_out = lambda: bool(_CURRENT and _CURRENT[0].get_closest_marker("own_ray"))  # noqa: E731
        ray.init = ray_session.redirect_init(ray.init, _SHARED_RAY, opted_out)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _CURRENT[:] = [item]
    _COUNTER.current = item.nodeid
    yield
    _COUNTER.current = "(between tests)"


def pytest_sessionfinish(session: pytest.Session) -> None:
    _SHARED_RAY.stop()
    _COUNTER.stop()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if os.environ.get("PIPELINE_TEST_TIER") == "fast":
        return
    per_test = _COUNTER.by_test()
    terminalreporter.write_line(
        f"ray clusters started: {sum(per_test.values())} (GCS servers of this session; "
        f"{_SHARED_RAY.joins} ray.init calls joined the shared cluster)")
    for nodeid, n in per_test.most_common():
        terminalreporter.write_line(f"  {n} {nodeid}")


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get("PIPELINE_TEST_TIER") != "fast":
        return
    if any(request.node.get_closest_marker(m) for m in FAST_TIER_EXCLUDES):
        return
    original = subprocess.Popen.__init__

    def refuse(self: subprocess.Popen, args: object, *a: object, **kw: object) -> None:
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) and args else args).split()[0])
        if program in ALLOWED_IN_FAST_TIER:
            original(self, args, *a, **kw)
            return
        raise RuntimeError(
            f"{request.node.nodeid} starts a process ({args!r}) in the fast tier: mark it "
            "@pytest.mark.subprocess (or ray / server / e2e) so that `make test-fast` leaves it to `make test`"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri() -> Iterator[None]:
    """`mlflow.set_tracking_uri` is process-global: a test that sets it would point every later test in the session
    at its (by then deleted) store. Restored after each test; mlflow is only touched when a test imported it."""
    import sys

    mlflow = sys.modules.get("mlflow")
    before = mlflow.get_tracking_uri() if mlflow is not None and hasattr(mlflow, "get_tracking_uri") else None
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and hasattr(mlflow, "set_tracking_uri"):
        mlflow.set_tracking_uri(before)
