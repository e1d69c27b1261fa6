"""Detect and enumerate raw image-classification layouts without decoding a single image.

A source is listed as `Sample`s (key, wnid, split, opener) plus the class list `ClassInfo(index, wnid, name)`,
indices following SORTED wnids, torchvision's ImageNet convention (its pretrained weights use it too).

Layouts (`detect_source` picks one for `source: auto`):

- `kaggle`: Kaggle's "ImageNet Object Localization Challenge" download: `ILSVRC/Data/CLS-LOC/{train,val}`,
  `LOC_val_solution.csv`, `LOC_synset_mapping.txt`. The same reader accepts `train/` and a flat `val/` at the
  root, which is how the generated synthetic set is written.
- `synthetic`: the tree written by `pipeline.data.synthetic` (the kaggle reader, detected by its README).
- `folders`: an extracted ImageNet, `train/<wnid>/*` and `val/<wnid>/*` (val sorted into class folders).
- `imagefolder`: torchvision-ImageFolder style `train/<class>/*` + `val/<class>/*` of the user's own classes.
- `ilsvrc_tar`: the three official files, read by seeking into the tars, never extracted to disk:
  `ILSVRC2012_img_train.tar` (a tar of per-class tars), `ILSVRC2012_img_val.tar`,
  `ILSVRC2012_devkit_t12.tar.gz` (`data/meta.mat` + `data/ILSVRC2012_validation_ground_truth.txt`).

Keys are paths relative to the raw folder (POSIX separators), so they do not depend on where it is mounted.
Hidden files and folders (names starting with ".") are skipped; every other file is an input, and inputs that
cannot be listed (an unreadable folder, a file outside any class folder, a val image without a label) are
returned as `Rejection`s so that prepare reports them: nothing is dropped silently.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

Split = Literal["train", "val"]
SPLITS: tuple[Split, Split] = ("train", "val")
LAYOUTS = ("kaggle", "synthetic", "folders", "imagefolder", "ilsvrc_tar")

SYNTHETIC_README = "SYNTHETIC_README.txt"
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
KAGGLE_SUBDIR = Path("ILSVRC", "Data", "CLS-LOC")
ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
ILSVRC_VAL_TAR = "ILSVRC2012_img_val.tar"
ILSVRC_DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
# Mapping files an extracted ImageNet usually carries next to train/ (Kaggle's and Caffe's names).
NAME_FILES = (KAGGLE_MAPPING, "synset_words.txt")

_WNID = re.compile(r"^n\d{8}$")


class DataError(ValueError):
    """The raw data or a data option is wrong; the message names the folder or file involved."""


class ClassInfo(NamedTuple):
    index: int
    wnid: str
    name: str


class Rejection(NamedTuple):
    key: str
    split: str
    reason: str


def read_file_bytes(path: str) -> bytes:
    """Read a whole file. Module-level so tests can simulate unreadable files when running as root."""
    with open(path, "rb") as fh:
        return fh.read()


def scan_dir(path: str | Path) -> list[os.DirEntry[str]]:
    """Sorted, non-hidden entries of a folder. Raises PermissionError for an unreadable folder.

    Module-level (and used for every folder we list) so tests can simulate unreadable folders as root.
    """
    with os.scandir(path) as it:
        return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)


@dataclass(frozen=True, slots=True)
class FileOpener:
    """Returns the bytes of one file; picklable so prepare's worker processes can call it."""

    path: str

    def __call__(self) -> bytes:
        return read_file_bytes(self.path)


@dataclass(frozen=True, slots=True)
class TarMemberOpener:
    """Returns the bytes of one member of an uncompressed tar, by seeking to its data (no extraction)."""

    tar_path: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        with open(self.tar_path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar_path} ends inside a member ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True, slots=True)
class Sample:
    """One input image: where it is (`key`, `opener`), its class and split, and what fingerprints it."""

    key: str
    wnid: str
    split: Split
    opener: Callable[[], bytes]
    size: int = 0
    mtime_ns: int = 0


@dataclass
class SourceListing:
    layout: str
    root: Path
    classes: list[ClassInfo]
    samples: list[Sample]
    rejected: list[Rejection] = field(default_factory=list)

    def label_of(self) -> dict[str, int]:
        return {c.wnid: c.index for c in self.classes}


# --------------------------------------------------------------------------------------------- detection


def _check_root(raw_dir: str | os.PathLike[str]) -> Path:
    root = Path(raw_dir)
    if not root.exists():
        raise DataError(f"raw data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"raw data path is not a folder: {root}")
    try:
        entries = scan_dir(root)
    except PermissionError as exc:
        raise DataError(f"raw data folder is not readable: {root} ({exc.strerror})") from None
    if not entries:
        raise DataError(f"raw data folder is empty: {root}")
    return root


def detect_source(raw_dir: str | os.PathLike[str]) -> str:
    """Name the layout of `raw_dir` (one of LAYOUTS); DataError naming the folder when none fits."""
    root = _check_root(raw_dir)
    if (root / ILSVRC_TRAIN_TAR).is_file() or (root / ILSVRC_VAL_TAR).is_file():
        return "ilsvrc_tar"
    if (root / SYNTHETIC_README).is_file():
        return "synthetic"
    if (root / KAGGLE_SUBDIR).is_dir() or (root / KAGGLE_SOLUTION).is_file():
        return "kaggle"
    train = root / "train"
    if train.is_dir():
        try:
            names = [e.name for e in scan_dir(train) if e.is_dir()]
        except PermissionError as exc:
            raise DataError(f"folder is not readable: {train} ({exc.strerror})") from None
        if names and all(_WNID.match(n) for n in names):
            return "folders"
        return "imagefolder"
    raise DataError(
        f"cannot tell the layout of {root}: expected the ImageNet tars ({ILSVRC_TRAIN_TAR}, ...), Kaggle's "
        f"{KAGGLE_SUBDIR.as_posix()}/ + {KAGGLE_SOLUTION}, or train/<class>/ + val/<class>/ folders"
    )


# ------------------------------------------------------------------------------------------------ helpers


def _read_names(root: Path) -> dict[str, str]:
    """`<wnid> <name>` per line (LOC_synset_mapping.txt, synset_words.txt); empty when neither exists."""
    for fname in NAME_FILES:
        path = root / fname
        if path.is_file():
            names: dict[str, str] = {}
            for line in path.read_text(encoding="utf-8").splitlines():
                wnid, _, name = line.strip().partition(" ")
                if wnid:
                    names[wnid] = name.strip() or wnid
            return names
    return {}


def _select_classes(
    wnids: Sequence[str],
    names: dict[str, str],
    classes: Sequence[str],
    first_n_classes: int | None,
    where: Path,
) -> list[ClassInfo]:
    """Apply the `classes` / `first_n_classes` subset, then index the kept classes by sorted wnid."""
    available = sorted(set(wnids))
    if not available:
        raise DataError(f"no classes found in {where}")
    kept = available
    if classes:
        unknown = sorted(set(classes) - set(available))
        if unknown:
            raise DataError(
                f"data.classes names {len(unknown)} class(es) not in {where}: {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''} (available e.g. {available[:3]})"
            )
        kept = sorted(set(classes))
    if first_n_classes is not None:
        if first_n_classes < 1:
            raise DataError(f"data.first_n_classes must be >= 1, got {first_n_classes}")
        kept = kept[:first_n_classes]
    return [ClassInfo(i, w, names.get(w, w)) for i, w in enumerate(kept)]


def _relkey(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _check_link(root: Path, path: Path) -> None:
    """A symlink under raw_dir is followed only to a target inside raw_dir: raw data we did not make must not
    pull in files from elsewhere on the machine (an image outside raw_dir would enter the shards), and a link that
    loops is named instead of failing deep in a walk. A dangling link is left to the caller (a rejection)."""
    if not path.is_symlink():
        return
    try:
        target = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"symlink loop at {path} (-> {os.readlink(path)}): fix or remove the link") from None
        raise
    real_root = Path(os.path.realpath(root))
    if not target.is_relative_to(real_root):
        raise DataError(f"{path} is a symlink to {target}, outside data.raw_dir {root}: not followed. Point "
                        "data.raw_dir at a folder that holds the data itself (it may be a symlink), or copy it in")


def _walk_files(root: Path, folder: Path, wnid: str, split: Split, rejected: list[Rejection],
                _parents: tuple[str, ...] = ()) -> list[Sample]:
    """Every non-hidden file below `folder` (recursively, sorted), as samples of class `wnid`.

    Recursion matches torchvision's ImageFolder; an unreadable subfolder becomes one rejection. Symlinks are
    followed inside raw_dir only (`_check_link`); one that leads back into a folder being walked is a DataError.
    """
    out: list[Sample] = []
    _check_link(root, folder)
    real = os.path.realpath(folder)
    if real in _parents:
        raise DataError(f"symlink loop: {folder} leads back to {real}, which contains it; fix or remove the link")
    try:
        entries = scan_dir(folder)
    except PermissionError as exc:
        rejected.append(Rejection(_relkey(root, folder) + "/", split, f"unreadable folder: {exc.strerror}"))
        return out
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink():
            _check_link(root, path)
        if entry.is_dir():
            out.extend(_walk_files(root, path, wnid, split, rejected, (*_parents, real)))
            continue
        key = _relkey(root, path)
        try:
            st = entry.stat()
        except OSError as exc:
            rejected.append(Rejection(key, split, f"unreadable: {exc.strerror}"))
            continue
        out.append(Sample(key, wnid, split, FileOpener(str(path)), st.st_size, st.st_mtime_ns))
    return out


def _cap(samples: list[Sample], max_per_class: int | None) -> list[Sample]:
    """Keep the first `max_per_class` train samples of each class by sorted key (deterministic)."""
    if max_per_class is None:
        return samples
    if max_per_class < 1:
        raise DataError(f"data.max_per_class must be >= 1, got {max_per_class}")
    taken: dict[str, int] = {}
    out = []
    for s in sorted(samples, key=lambda s: s.key):
        if taken.get(s.wnid, 0) < max_per_class:
            taken[s.wnid] = taken.get(s.wnid, 0) + 1
            out.append(s)
    return out


def _class_dirs(split_dir: Path) -> tuple[list[os.DirEntry[str]], list[os.DirEntry[str]]]:
    """(class folders, loose files) directly inside a split folder."""
    try:
        entries = scan_dir(split_dir)
    except PermissionError as exc:
        raise DataError(f"folder is not readable: {split_dir} ({exc.strerror})") from None
    return [e for e in entries if e.is_dir()], [e for e in entries if not e.is_dir()]


# ---------------------------------------------------------------------------------------- folder layouts


def _list_class_folders(
    root: Path,
    split_dir: Path,
    split: Split,
    selected: dict[str, ClassInfo],
    known: set[str],
    rejected: list[Rejection],
) -> list[Sample]:
    """Samples of `split_dir/<class>/...` for the selected classes; an unknown class folder is an error."""
    dirs, loose = _class_dirs(split_dir)
    strangers = sorted(d.name for d in dirs if d.name not in known)
    if strangers:
        raise DataError(
            f"{split_dir} has class folder(s) that train/ lacks: {strangers[:5]}"
            f"{' ...' if len(strangers) > 5 else ''}"
        )
    for e in loose:
        rejected.append(Rejection(_relkey(root, Path(e.path)), split, "not inside a class folder"))
    samples: list[Sample] = []
    for d in dirs:
        if d.name in selected:
            samples.extend(_walk_files(root, Path(d.path), d.name, split, rejected))
    return samples


def _list_folders(
    root: Path,
    *,
    imagefolder: bool,
    classes: Sequence[str],
    first_n_classes: int | None,
    max_per_class: int | None,
) -> SourceListing:
    layout = "imagefolder" if imagefolder else "folders"
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir():
        raise DataError(f"{layout} layout needs {train_dir}/<class>/ folders; {train_dir} not found")
    if not val_dir.is_dir():
        raise DataError(
            f"{layout} layout needs a val/ folder next to train/ ({val_dir} not found): put held-out images "
            f"in val/<class>/ with the same class folder names as train/"
        )
    train_dirs, _ = _class_dirs(train_dir)
    wnids = [d.name for d in train_dirs]
    names = {} if imagefolder else _read_names(root)
    chosen = _select_classes(wnids, names, classes, first_n_classes, train_dir)
    selected = {c.wnid: c for c in chosen}
    val_dirs, val_loose = _class_dirs(val_dir)
    if val_loose and not val_dirs:
        raise DataError(
            f"{val_dir} holds {len(val_loose)} file(s) but no class folders: sort them into val/<class>/, "
            f"or, for ImageNet's flat val/, add Kaggle's {KAGGLE_SOLUTION} at {root} (the kaggle layout)"
        )
    rejected: list[Rejection] = []
    train = _list_class_folders(root, train_dir, "train", selected, set(wnids), rejected)
    val = _list_class_folders(root, val_dir, "val", selected, set(wnids), rejected)
    return SourceListing(layout, root, chosen, _cap(train, max_per_class) + val, rejected)


def _read_solution(path: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: ImageId -> wnid (the first token of PredictionString)."""
    out: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected the header ImageId,PredictionString")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if tokens:
                out[row["ImageId"].strip()] = tokens[0]
    return out


def _list_kaggle(
    root: Path,
    *,
    layout: str,
    classes: Sequence[str],
    first_n_classes: int | None,
    max_per_class: int | None,
) -> SourceListing:
    base = root / KAGGLE_SUBDIR if (root / KAGGLE_SUBDIR).is_dir() else root
    train_dir, val_dir = base / "train", base / "val"
    if not train_dir.is_dir():
        raise DataError(f"{layout} layout: {train_dir} not found")
    if not val_dir.is_dir():
        raise DataError(f"{layout} layout: {val_dir} not found (the val images are needed for evaluation)")
    names = _read_names(root)
    train_dirs, train_loose = _class_dirs(train_dir)
    wnids = [d.name for d in train_dirs]
    chosen = _select_classes(wnids, names, classes, first_n_classes, train_dir)
    selected = {c.wnid: c for c in chosen}
    known = set(wnids) | set(names)
    rejected = [
        Rejection(_relkey(root, Path(e.path)), "train", "not inside a class folder") for e in train_loose
    ]
    train: list[Sample] = []
    for d in train_dirs:
        if d.name in selected:
            train.extend(_walk_files(root, Path(d.path), d.name, "train", rejected))

    # Kaggle's val/ is flat and labelled by the CSV; a val/ already sorted into class folders also works.
    val_dirs, val_files = _class_dirs(val_dir)
    val: list[Sample] = []
    for d in val_dirs:
        if d.name not in known:
            raise DataError(f"{val_dir} has a class folder that train/ lacks: {d.name}")
        if d.name in selected:
            val.extend(_walk_files(root, Path(d.path), d.name, "val", rejected))
    if val_files:
        solution_path = root / KAGGLE_SOLUTION
        if not solution_path.is_file():
            raise DataError(f"{val_dir} is flat but {solution_path} (its labels) is missing")
        solution = _read_solution(solution_path)
        for e in val_files:
            _check_link(root, Path(e.path))
            key = _relkey(root, Path(e.path))
            wnid = solution.get(Path(e.name).stem)
            if wnid is None:
                rejected.append(Rejection(key, "val", f"no label in {KAGGLE_SOLUTION}"))
            elif wnid not in known:
                rejected.append(Rejection(key, "val", f"label {wnid} is not a known class"))
            elif wnid in selected:
                try:
                    st = e.stat()
                except OSError as exc:
                    rejected.append(Rejection(key, "val", f"unreadable: {exc.strerror}"))
                    continue
                val.append(Sample(key, wnid, "val", FileOpener(e.path), st.st_size, st.st_mtime_ns))
    return SourceListing(layout, root, chosen, _cap(train, max_per_class) + val, rejected)


# ------------------------------------------------------------------------------------------ official tars


def _read_devkit(path: Path) -> tuple[dict[int, tuple[str, str]], list[int]]:
    """-> ({ILSVRC2012_ID: (wnid, words)} of the 1000 leaf synsets, val ground truth IDs in val order)."""
    meta_bytes = truth_text = None
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith("data/meta.mat"):
                    meta_bytes = _extract(tf, m)
                elif m.isfile() and m.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                    truth_text = _extract(tf, m).decode("ascii")
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if meta_bytes is None or truth_text is None:
        raise DataError(f"{path} lacks data/meta.mat or data/ILSVRC2012_validation_ground_truth.txt")
    try:
        from scipy.io import loadmat  # only the devkit needs scipy: keep it optional
    except ImportError:
        raise DataError(
            f"reading {path.name}/data/meta.mat (the class list of the official tars) needs scipy: "
            f"pip install scipy"
        ) from None
    synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    leaves: dict[int, tuple[str, str]] = {}
    for rec in synsets.ravel():
        # Leaves (num_children == 0) are the 1000 classes; the other 860 synsets are WordNet ancestors.
        if int(rec["num_children"]) == 0:
            leaves[int(rec["ILSVRC2012_ID"])] = (str(rec["WNID"]), str(rec["words"]))
    truth = [int(line) for line in truth_text.split()]
    return leaves, truth


def _extract(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(member)
    if fh is None:
        raise DataError(f"{tf.name}: cannot read member {member.name}")
    with fh:
        return fh.read()


def _list_ilsvrc_tar(
    root: Path,
    *,
    classes: Sequence[str],
    first_n_classes: int | None,
    max_per_class: int | None,
) -> SourceListing:
    train_tar, val_tar, devkit = root / ILSVRC_TRAIN_TAR, root / ILSVRC_VAL_TAR, root / ILSVRC_DEVKIT
    for path in (train_tar, val_tar, devkit):
        if not path.is_file():
            raise DataError(f"ilsvrc_tar layout needs {path.name} in {root}; {path} not found")
    leaves, truth = _read_devkit(devkit)
    names = dict(leaves.values())
    chosen = _select_classes(list(names), names, classes, first_n_classes, devkit)
    selected = {c.wnid for c in chosen}
    rejected: list[Rejection] = []
    train: list[Sample] = []
    try:
        with tarfile.open(train_tar, "r:") as outer, open(train_tar, "rb") as raw:
            for m in outer:
                wnid = Path(m.name).name.removesuffix(".tar")
                if not m.isfile() or wnid not in selected:
                    continue
                # TarFile takes the file position it is opened at as its origin, so the inner members'
                # offset_data are absolute offsets in the outer file: we can seek to them later.
                raw.seek(m.offset_data)
                with tarfile.open(fileobj=raw, mode="r:") as inner:
                    for im in inner:
                        if not im.isfile() or Path(im.name).name.startswith("."):
                            continue
                        key = f"{train_tar.name}/{m.name}/{im.name}"
                        if im.offset_data + im.size > m.offset_data + m.size:
                            rejected.append(
                                Rejection(key, "train", "member runs past the end of its class tar")
                            )
                            continue
                        opener = TarMemberOpener(str(train_tar), im.offset_data, im.size)
                        train.append(Sample(key, wnid, "train", opener, im.size, int(im.mtime) * 10**9))
    except tarfile.TarError as exc:
        raise DataError(f"cannot read {train_tar}: {exc}") from None
    val: list[Sample] = []
    try:
        with tarfile.open(val_tar, "r:") as tf:
            for m in tf:
                if not m.isfile() or Path(m.name).name.startswith("."):
                    continue
                key = f"{val_tar.name}/{m.name}"
                match = re.search(r"_(\d+)$", Path(m.name).stem)
                number = int(match.group(1)) if match else 0
                if not 1 <= number <= len(truth) or truth[number - 1] not in leaves:
                    rejected.append(Rejection(key, "val", "no label in the devkit ground truth"))
                    continue
                wnid = leaves[truth[number - 1]][0]
                if wnid in selected:
                    opener = TarMemberOpener(str(val_tar), m.offset_data, m.size)
                    val.append(Sample(key, wnid, "val", opener, m.size, int(m.mtime) * 10**9))
    except tarfile.TarError as exc:
        raise DataError(f"cannot read {val_tar}: {exc}") from None
    return SourceListing("ilsvrc_tar", root, chosen, _cap(train, max_per_class) + val, rejected)


# ------------------------------------------------------------------------------------------------- entry


def list_source(
    raw_dir: str | os.PathLike[str],
    source: str = "auto",
    *,
    classes: Sequence[str] = (),
    first_n_classes: int | None = None,
    max_per_class: int | None = None,
) -> SourceListing:
    """List `raw_dir` as samples + classes, with the subset options applied.

    `classes` keeps those wnids (class folder names for imagefolder); `first_n_classes` then keeps the first N
    by sorted wnid; `max_per_class` caps TRAIN images per class (first N by sorted key). Labels are re-indexed
    0..K-1 over the kept classes. Samples come sorted by key.
    """
    root = _check_root(raw_dir)
    layout = detect_source(root) if source == "auto" else source
    if layout in ("kaggle", "synthetic"):
        listing = _list_kaggle(
            root, layout=layout, classes=classes, first_n_classes=first_n_classes, max_per_class=max_per_class
        )
    elif layout in ("folders", "imagefolder"):
        listing = _list_folders(
            root,
            imagefolder=layout == "imagefolder",
            classes=classes,
            first_n_classes=first_n_classes,
            max_per_class=max_per_class,
        )
    elif layout == "ilsvrc_tar":
        listing = _list_ilsvrc_tar(
            root, classes=classes, first_n_classes=first_n_classes, max_per_class=max_per_class
        )
    else:
        raise DataError(f"unknown data.source {source!r}; choose from auto, {', '.join(LAYOUTS)}")
    listing.samples.sort(key=lambda s: s.key)
    for split in SPLITS:
        if not any(s.split == split for s in listing.samples):
            raise DataError(f"no {split} images found in {root} (layout {layout}, after the class subset)")
    return listing
