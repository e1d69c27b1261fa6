"""The shard format, in one place: the schema, the writer prepare uses, the manifest, verified reads.

`shards_dir` is a local path or a URI (pipeline.runtime). Readers take their file list from `shard_files`
(the manifest), never from a directory glob: a glob would also pick up stray files, and only the manifest's
sizes and sha256 say a shard is the one that was prepared.

Verification is split so that it scales with the files a run reads, not with the dataset's bytes:
- start-up (`shard_files(verify=True)`): the manifest, each file's size from one listing per split, and the
  Parquet footer (row count, schema) of exactly the files the run will read: kilobytes per shard;
- every read (`read_shard`, and the Ray Data read task of pipeline.data.ingest): the whole file is hashed with
  sha256 while it is read, and a shard whose bytes differ from the manifest is refused with its name before a
  row of it is used. The hash runs on bytes the reader fetches anyway; bench/bench_startup.py measures
  sha256 against the JPEG decoding that follows (a few per cent of it), which is why no faster checksum
  is recorded next to it;
- `verify_shards` (`python -m stages.prepare --verify`): everything, every byte, on demand.

Audit: with the environment variable PIPELINE_SHARD_READ_LOG set to a file path, every footer check and every
verified read appends one line `footer|bytes<TAB>location` to that file, from whichever process (Ray task, Train
worker, Tune trial) does it; tests/test_tuning.py uses it to show that tune never opens a val shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, get_type_hints

from pipeline import runtime
from pipeline.data.sources import SPLITS, DataError

if TYPE_CHECKING:  # pyarrow is imported only by the helpers that need it: keep this module light
    import pyarrow as pa

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: every shard entry has `nbytes` (start-up size check) besides rows and sha256
# ~25 MB row groups at ImageNet's ~110 KB/image: readers can stream a shard without holding all of it.
ROW_GROUP_ROWS = 256
# Footers are read with this many threads: one small ranged GET each on an object store.
FOOTER_THREADS = 16


@functools.cache
def shard_schema() -> pa.Schema:
    """The schema every shard has; fixed so shards are byte-identical and readers can rely on it."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("image", pa.binary(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("wnid", pa.string(), nullable=False),
            pa.field("key", pa.string(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
        ]
    )


def encode_shard(columns: dict[str, list[Any]]) -> bytes:
    """One shard's Parquet bytes from its columns (the writer of `prepare_shards`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(columns, schema=shard_schema())
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression="NONE",  # JPEG bytes do not compress; a fixed codec also keeps the bytes reproducible
        use_dictionary=["wnid"],
        write_statistics=["label", "wnid", "height", "width"],  # min/max of image bytes would bloat footers
    )
    return sink.getvalue().to_pybytes()


READ_LOG_ENV = "PIPELINE_SHARD_READ_LOG"


def record_read(kind: str, loc: str) -> None:
    """Append `kind<TAB>loc` to the file named by PIPELINE_SHARD_READ_LOG, if set (one short O_APPEND write per
    shard: whole lines even from concurrent processes on a local disk)."""
    log = os.environ.get(READ_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{kind}\t{loc}\n")


class ManifestError(DataError):
    """The manifest is missing or malformed; the message names the path."""


class ShardChecksumError(DataError):
    """A shard differs from the manifest (bytes, size, footer) or is missing; the message names it."""


class ManifestUnreadable(ManifestError):
    """The store failed to deliver the manifest (an I/O error other than "not found"): may pass on a retry, so
    Ray Train's `train.max_failures` still retries it (pipeline.training.errors)."""


class ShardUnreadable(ShardChecksumError):
    """Reading a shard failed with an I/O error (a network or object-store error): may pass on a retry, unlike a
    shard whose bytes differ from the manifest."""


def _root(shards_dir: str | os.PathLike[str]) -> str:
    """Local folders as absolute, symlink-free paths (what readers on any working directory need)."""
    loc = os.fspath(shards_dir)
    return loc.rstrip("/") if runtime.is_uri(loc) else str(Path(loc).resolve())


def manifest_location(shards_dir: str | os.PathLike[str]) -> str:
    return runtime.join(_root(shards_dir), MANIFEST)


class ShardEntry(TypedDict):
    path: str  # relative to shards_dir: "train/00000.parquet"
    rows: int
    nbytes: int  # checked against one listing at start-up
    sha256: str  # checked while the shard is read


class _CarvedSplit(TypedDict, total=False):
    """The minival split only: how it was carved out of train (see prepare.carve_minival)."""

    carved_from: str
    per_class: int
    seed: int
    keys_sha256: str  # sha256 of its sorted keys: two runs held out the same images


class SplitEntry(_CarvedSplit):
    n_images: int
    n_reencoded: int  # images prepare re-encoded (too large, not RGB JPEG)
    class_counts: dict[str, int]  # wnid -> images
    shards: list[ShardEntry]


class ClassEntry(TypedDict):
    index: int  # the label: position in sorted wnids
    wnid: str
    name: str


class SourceEntry(TypedDict):
    layout: str  # ilsvrc_tar | kaggle | folders | imagefolder
    raw_dir: str
    fingerprint: str  # of the raw listing (names, sizes, mtimes)


class Manifest(TypedDict):
    """`manifest.json`, written last by prepare: a manifest means a complete dataset."""

    version: int  # MANIFEST_VERSION
    source: SourceEntry
    fingerprint: str  # the dataset's identity: source fingerprint + prepare options
    classes: list[ClassEntry]
    num_classes: int
    splits: dict[str, SplitEntry]
    n_inputs: int
    rejected: int
    options: dict[str, Any]  # the prepare options that shaped the shards


def _missing_keys(obj: Any, schema: Any) -> list[str]:
    """Keys of the TypedDict `schema` that `obj` lacks, dotted, nested entries included."""
    if not isinstance(obj, dict):
        return ["(not an object)"]
    hints = get_type_hints(schema)
    missing = [key for key in hints if key in schema.__required_keys__ and key not in obj]
    nested = {"source": SourceEntry}
    for key, sub in nested.items():
        if key in obj and key in hints:
            missing += [f"{key}.{m}" for m in _missing_keys(obj[key], sub)]
    if schema is Manifest:
        for i, cls in enumerate(obj.get("classes") or []):
            missing += [f"classes[{i}].{m}" for m in _missing_keys(cls, ClassEntry)]
        for split, entry in (obj.get("splits") or {}).items():
            missing += [f"splits.{split}.{m}" for m in _missing_keys(entry, SplitEntry)]
            for i, shard in enumerate(entry.get("shards") or [] if isinstance(entry, dict) else []):
                missing += [f"splits.{split}.shards[{i}].{m}" for m in _missing_keys(shard, ShardEntry)]
    return missing


def parse_manifest(data: bytes, where: str) -> Manifest:
    """Decode and check a manifest: every key of `Manifest` present, or ManifestError naming the file and keys."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or "splits" not in manifest or "classes" not in manifest:
        raise ManifestError(f"{where} is not a shard manifest (no 'splits' or 'classes')")
    missing = _missing_keys(manifest, Manifest)
    if missing:
        raise ManifestError(
            f"{where} was written by an older prepare or is damaged (missing {', '.join(missing[:5])}): run the "
            "prepare stage again"
        )
    return manifest  # type: ignore[return-value]  (checked above)


def write_manifest(shards_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write `manifest.json` atomically; prepare calls it last, after every shard is in place."""
    runtime.write_json(manifest_location(shards_dir), manifest)


def read_manifest_bytes(shards_dir: str | os.PathLike[str]) -> bytes:
    where = manifest_location(shards_dir)
    try:
        return runtime.read_bytes(where)
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {where}: run the prepare stage (python -m stages.prepare)") from None
    except OSError as exc:  # pyarrow reports a missing object, a denied bucket, ... as OSError
        if runtime.is_uri(where) and "not found" not in str(exc).lower() and "nosuch" not in str(exc).lower():
            raise ManifestUnreadable(f"cannot read the shard manifest at {where}: {exc}") from None
        raise ManifestError(f"no shard manifest at {where}: run the prepare stage (python -m stages.prepare)") from None


def dataset_name(manifest: Manifest) -> str:
    """The dataset's short name (registered models are `{arch}-{dataset}`; MLflow's dataset inputs use it)."""
    layout = manifest["source"]["layout"]
    if layout == "synthetic":
        return "synthetic"
    if layout == "imagefolder":
        return "custom"
    return "imagenet" if int(manifest["num_classes"]) == 1000 else f"imagenet{manifest['num_classes']}"


def read_manifest(shards_dir: str | os.PathLike[str]) -> Manifest:
    return parse_manifest(read_manifest_bytes(shards_dir), manifest_location(shards_dir))


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _split_entry(manifest: Manifest, split: str, where: str) -> SplitEntry:
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"{where} has no split {split!r}; it has {sorted(splits)}")
    entry: SplitEntry = splits[split]
    if entry["shards"] and "nbytes" not in entry["shards"][0]:
        raise ManifestError(f"{where} was written by an older prepare (no shard sizes): run the prepare stage again")
    return entry


def shard_files(
    shards_dir: str | os.PathLike[str], split: str, verify: bool = True, limit: int | None = None
) -> list[str]:
    """Locations (absolute paths or URIs) of `split`'s shards in manifest order, the first `limit` of them.

    With `verify`, the cheap start-up checks of exactly those files: present, the manifest's size, a readable
    Parquet footer with the manifest's row count and the shard schema. Their bytes are checked when read.
    """
    root = _root(shards_dir)
    where = manifest_location(root)
    entries = _split_entry(read_manifest(root), split, where)["shards"][:limit]
    paths = [runtime.join(root, s["path"]) for s in entries]
    if verify and entries:
        _check_sizes(root, entries, where)
        _check_footers(paths, entries)
    return paths


def _check_sizes(root: str, entries: list[ShardEntry], where: str) -> None:
    listings: dict[str, dict[str, int]] = {}
    for shard in entries:
        folder, _, name = shard["path"].rpartition("/")
        if folder not in listings:
            listings[folder] = runtime.list_files(runtime.join(root, folder))
        size = listings[folder].get(name)
        loc = runtime.join(root, shard["path"])
        if size is None:
            raise ShardChecksumError(f"shard {loc} listed in {where} is missing: rerun the prepare stage")
        if size != shard["nbytes"]:
            raise ShardChecksumError(
                f"shard {loc} has {size} bytes, {where} says {shard['nbytes']}: it changed after prepare; "
                "rerun the prepare stage"
            )


def _footer_problem(loc: str, shard: ShardEntry) -> str | None:
    import pyarrow.parquet as pq

    record_read("footer", loc)
    fs, path = runtime.resolve(loc)
    try:
        # A HEAD and one or two ranged GETs on an object store: kilobytes, whatever the shard's size.
        with fs.open_input_file(path) as f:
            meta = pq.read_metadata(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, ... for a bad footer
        return f"shard {loc} has no readable Parquet footer ({exc}): rerun the prepare stage"
    if meta.num_rows != shard["rows"]:
        return f"shard {loc} has {meta.num_rows} rows in its footer, the manifest says {shard['rows']}"
    if not meta.schema.to_arrow_schema().remove_metadata().equals(shard_schema()):
        return f"shard {loc} does not have the shard schema: rerun the prepare stage"
    return None


def _check_footers(paths: list[str], entries: list[ShardEntry]) -> None:
    if len(paths) == 1 or not runtime.is_uri(paths[0]):
        problems = [_footer_problem(p, s) for p, s in zip(paths, entries, strict=True)]
    else:
        with ThreadPoolExecutor(min(FOOTER_THREADS, len(paths))) as pool:
            problems = list(pool.map(_footer_problem, paths, entries))
    for problem in problems:
        if problem:
            raise ShardChecksumError(problem)


# ------------------------------------------------------------------------------------ reads that verify


def check_shard_bytes(loc: str, data: bytes | memoryview, nbytes: int, sha256: str) -> None:
    """Refuse a shard whose bytes are not the ones prepare recorded; the message names it. Every verified read
    of shard bytes comes through here (read_shard, the Ray Data read task), hence the audit record."""
    record_read("bytes", loc)
    if len(data) != nbytes:
        raise ShardChecksumError(
            f"shard {loc} has {len(data)} bytes, the manifest says {nbytes}: rerun the prepare stage"
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ShardChecksumError(
            f"shard {loc} has sha256 {actual[:12]}..., the manifest says {sha256[:12]}...: it changed after "
            "prepare; rerun the prepare stage"
        )


_EXPECTED_CACHE: dict[tuple[str, bytes], dict[str, tuple[int, str]]] = {}


def expected_digests(locations: list[str]) -> dict[str, tuple[int, str]]:
    """{location: (nbytes, sha256)} from the manifest of each shard's dataset (`<shards_dir>/<split>/NAME`)."""
    out: dict[str, tuple[int, str]] = {}
    for root in sorted({runtime.parent(runtime.parent(loc)) for loc in locations}):
        raw = read_manifest_bytes(root)
        key = (root, hashlib.sha256(raw).digest())
        if key not in _EXPECTED_CACHE:
            manifest = parse_manifest(raw, manifest_location(root))
            _EXPECTED_CACHE[key] = {
                runtime.join(root, s["path"]): (int(s["nbytes"]), str(s["sha256"]))
                for split in manifest["splits"].values() for s in split["shards"] if "nbytes" in s
            }
        out.update(_EXPECTED_CACHE[key])
    missing = [loc for loc in locations if loc not in out]
    if missing:
        raise ShardChecksumError(f"shard {missing[0]} is not listed in its dataset's {MANIFEST}")
    return {loc: out[loc] for loc in locations}


def parse_shard(data: bytes | memoryview, loc: str, columns: list[str] | None = None) -> pa.Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except Exception as exc:  # noqa: BLE001 - checked bytes that do not parse: say which file
        raise ShardChecksumError(f"shard {loc} cannot be read as Parquet: {exc}") from None


def read_shard(loc: str, columns: list[str] | None = None, expected: tuple[int, str] | None = None) -> pa.Table:
    """One shard as a Table, its bytes hashed while read and checked against the manifest (or `expected`)."""
    nbytes, sha = expected or expected_digests([loc])[loc]
    try:
        data = runtime.read_bytes(loc)
    except FileNotFoundError as exc:
        raise ShardChecksumError(f"shard {loc} cannot be read: {exc}") from None
    except OSError as exc:
        raise ShardUnreadable(f"shard {loc} cannot be read: {exc}") from None
    check_shard_bytes(loc, data, nbytes, sha)
    return parse_shard(data, loc, columns)


def verify_shards(shards_dir: str | os.PathLike[str]) -> list[str]:
    """Every problem found with the prepared shards (empty list = OK), every byte re-hashed: used by
    `stages.prepare --verify`, never before a run."""
    root = _root(shards_dir)
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
    for split in (*SPLITS, "minival"):
        entry = manifest["splits"].get(split)
        if entry is None:
            if split != "minival":  # manifests from before the minival split have none
                problems.append(f"manifest has no {split} split")
            continue
        present = runtime.list_files(runtime.join(root, split))
        listed = set()
        for shard in entry["shards"]:
            loc = runtime.join(root, shard["path"])
            listed.add(shard["path"].rpartition("/")[2])
            if shard["path"].rpartition("/")[2] not in present:
                problems.append(f"{shard['path']}: missing")
                continue
            data = runtime.read_bytes(loc)
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{shard['path']}: sha256 differs from the manifest")
                continue
            rows = parse_shard(data, loc, ["label"]).num_rows
            if rows != shard["rows"]:
                problems.append(f"{shard['path']}: {rows} rows, the manifest says {shard['rows']}")
        total = sum(s["rows"] for s in entry["shards"])
        if total != entry["n_images"] or sum(entry["class_counts"].values()) != total:
            problems.append(f"{split}: shard rows, n_images and class_counts disagree")
        extra = sorted(name for name in present if name not in listed)
        if extra:
            problems.append(f"{split}/: files not in the manifest: {extra[:5]}")
    return problems


def class_names(manifest: Manifest) -> list[str]:
    """Class names by label index."""
    return [c["name"] for c in sorted(manifest["classes"], key=lambda c: c["index"])]


def load_split_table(shards_dir: str | os.PathLike[str], split: str, verify: bool = True) -> pa.Table:
    """A whole split as one pyarrow Table (every shard's bytes checked). For tests and small evaluations only."""
    import pyarrow as pa

    paths = shard_files(shards_dir, split, verify=verify)
    if not paths:

        return shard_schema().empty_table()
    return pa.concat_tables([read_shard(p) for p in paths])


# ------------------------------------------------------------------------------ the same data on every node


def _fingerprint_here(shards_dir: str) -> tuple[str, str]:
    """(fingerprint or what went wrong, this node's address): runs on each node of the cluster."""
    import ray

    where = ray.util.get_node_ip_address()
    try:
        return str(read_manifest(shards_dir).get("fingerprint")), where
    except DataError as exc:
        return f"no dataset ({exc})", where


def check_nodes_see(shards_dir: str | os.PathLike[str], fingerprint: str, timeout_s: float = 120) -> None:
    """On a multi-node Ray cluster, every node that may run a training worker or a read task (every alive node
    with CPUs or GPUs) must read the same manifest at `shards_dir`; otherwise stop now, naming the node and
    the path, not hours later with a wrong or missing shard on one node. No-op without Ray or on one node."""
    import sys

    if "ray" not in sys.modules:  # no Ray in this process (an in-process run, a machine without Ray): one node
        return
    import ray

    if not ray.is_initialized():
        return
    nodes = [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0
                                                            or n["Resources"].get("GPU", 0) > 0)]
    if len(nodes) <= 1:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root = _root(shards_dir)
    probe = ray.remote(num_cpus=0, max_retries=0)(_fingerprint_here)
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(root)
        for n in nodes
    ]
    for node, ref in zip(nodes, refs, strict=True):
        seen, address = ray.get(ref, timeout=timeout_s)
        if seen != fingerprint:
            raise DataError(
                f"node {address} (Ray node {node['NodeID'][:12]}) sees {seen[:200]} at {root}, this driver sees "
                f"dataset {fingerprint[:12]}: every node that runs a training worker or a read task must see the "
                "same shards (a shared filesystem mounted at the same path, or the same object store and endpoint)"
            )
