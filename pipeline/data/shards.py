"""Read what `prepare_shards` wrote: the manifest, checksummed shard paths, small helpers for tests and eval.

Readers should take their file list from `shard_files` (the manifest), never from a directory glob: a glob
would also pick up stray files, and only the manifest's sha256 says a shard is the one that was prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.data.sources import SPLITS, DataError

if TYPE_CHECKING:  # pyarrow is imported only by the helpers that need it: keep this module light
    import pyarrow as pa

MANIFEST = "manifest.json"


class ManifestError(DataError):
    """The manifest is missing or malformed; the message names the path."""


class ShardChecksumError(DataError):
    """A shard's sha256 differs from the manifest's (or the shard is missing); the message names it."""


def dataset_name(manifest: dict[str, Any]) -> str:
    """The dataset's short name (registered models are `{arch}-{dataset}`; MLflow's dataset inputs use it)."""
    layout = manifest["source"]["layout"]
    if layout == "synthetic":
        return "synthetic"
    if layout == "imagefolder":
        return "custom"
    return "imagenet" if int(manifest["num_classes"]) == 1000 else f"imagenet{manifest['num_classes']}"


def read_manifest(shards_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no shard manifest at {path}: run the prepare stage (python -m stages.prepare)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or "splits" not in manifest or "classes" not in manifest:
        raise ManifestError(f"{path} is not a shard manifest (no 'splits' or 'classes')")
    return manifest


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _split_entry(manifest: dict[str, Any], split: str, where: Path) -> dict[str, Any]:
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"{where / MANIFEST} has no split {split!r}; it has {sorted(splits)}")
    entry: dict[str, Any] = splits[split]
    return entry


def shard_files(shards_dir: str | os.PathLike[str], split: str, verify: bool = True) -> list[str]:
    """Absolute paths of `split`'s shards in manifest order; with `verify`, each is re-hashed first."""
    root = Path(shards_dir).resolve()
    entry = _split_entry(read_manifest(root), split, root)
    paths = []
    for shard in entry["shards"]:
        path = root / shard["path"]
        if verify:
            if not path.is_file():
                raise ShardChecksumError(f"shard {path} listed in {root / MANIFEST} is missing")
            actual = sha256_file(path)
            if actual != shard["sha256"]:
                raise ShardChecksumError(
                    f"shard {path} has sha256 {actual[:12]}..., the manifest says {shard['sha256'][:12]}...: "
                    f"it changed after prepare; rerun the prepare stage"
                )
        paths.append(str(path))
    return paths


def verify_shards(shards_dir: str | os.PathLike[str]) -> list[str]:
    """Every problem found with the prepared shards (empty list = OK): used by `stages.prepare --verify`."""
    import pyarrow.parquet as pq

    root = Path(shards_dir)
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        return [str(exc)]
    problems: list[str] = []
    wnids = [c["wnid"] for c in manifest["classes"]]
    if [c["index"] for c in manifest["classes"]] != list(range(len(wnids))) or wnids != sorted(wnids):
        problems.append("class indices are not 0..K-1 over sorted wnids")
    if manifest.get("num_classes") != len(wnids):
        problems.append(f"num_classes {manifest.get('num_classes')} != {len(wnids)} classes listed")
    for split in SPLITS:
        entry = manifest["splits"].get(split)
        if entry is None:
            problems.append(f"manifest has no {split} split")
            continue
        listed = set()
        for shard in entry["shards"]:
            path = root / shard["path"]
            listed.add(path.name)
            if not path.is_file():
                problems.append(f"{shard['path']}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{shard['path']}: sha256 differs from the manifest")
                continue
            rows = pq.ParquetFile(path).metadata.num_rows
            if rows != shard["rows"]:
                problems.append(f"{shard['path']}: {rows} rows, the manifest says {shard['rows']}")
        total = sum(s["rows"] for s in entry["shards"])
        if total != entry["n_images"] or sum(entry["class_counts"].values()) != total:
            problems.append(f"{split}: shard rows, n_images and class_counts disagree")
        split_dir = root / split
        if split_dir.is_dir():
            extra = sorted(p.name for p in split_dir.iterdir() if p.name not in listed)
            if extra:
                problems.append(f"{split}/: files not in the manifest: {extra[:5]}")
    return problems


def class_names(manifest: dict[str, Any]) -> list[str]:
    """Class names by label index."""
    return [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["index"])]


def load_split_table(shards_dir: str | os.PathLike[str], split: str, verify: bool = True) -> pa.Table:
    """A whole split as one pyarrow Table (checksums verified). For tests and small evaluations only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = shard_files(shards_dir, split, verify=verify)
    if not paths:
        from pipeline.data.prepare import SHARD_SCHEMA

        return SHARD_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p) for p in paths])
