"""Where shards live: a local path or a URI (s3://, gs://, file://, anything pyarrow.fs opens), one interface.

`data.shards_dir` and `train.storage_path` may be either. Endpoint and credentials come only from the
environment or the cloud's usual chain, never from params: pyarrow's S3 client reads `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles and instance roles itself, but it ignores
`AWS_ENDPOINT_URL` (apache/arrow#49643), which boto3 and the AWS CLI honour; `s3_filesystem` passes it (or
`AWS_ENDPOINT_URL_S3`) as `endpoint_override`, so an S3-compatible store (MinIO, Ceph, R2) configured for the
AWS CLI works here too. The filesystem objects carry no secret of ours when pickled to Ray tasks: each node
resolves credentials from its own environment.

Writes are atomic for readers: a local file is written to `NAME.tmp` and renamed; an object store makes an
object visible only when its upload completes. Prepare writes the manifest last, so a manifest means a
complete dataset either way.
"""

from __future__ import annotations

import functools
import os
import posixpath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike[str]) -> bool:
    return "://" in os.fspath(location)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base`/part/...; URIs keep their scheme and use "/" whatever the OS."""
    base = os.fspath(base)
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def parent(location: str) -> str:
    if is_uri(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(location)


def endpoint_from_env() -> str | None:
    """The S3 endpoint the environment names (the AWS CLI's variables), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.FileSystem:
    import pyarrow.fs as pafs

    kw: dict[str, object] = {}
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw["endpoint_override"] = url.netloc + url.path.rstrip("/")
        kw["scheme"] = url.scheme or "https"
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def s3_filesystem() -> pafs.FileSystem:
    return _s3(endpoint_from_env(), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). Local paths become absolute; `s3://` goes through `s3_filesystem`."""
    import pyarrow.fs as pafs

    location = os.fspath(location)
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    scheme, rest = location.split("://", 1)
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + rest.lstrip("/")
    if scheme in ("s3", "s3a"):
        return s3_filesystem(), rest.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(location)
    return fs, path


def resolve_many(locations: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """One filesystem for a list of files (a dataset's shards all live in one place)."""
    if not locations:
        fs, _ = resolve(".")
        return fs, []
    fs, first = resolve(locations[0])
    paths = [first] + [resolve(loc)[1] for loc in locations[1:]]
    return fs, paths


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig. Ray builds its own S3 client from a URI and,
    like pyarrow, ignores AWS_ENDPOINT_URL: with an endpoint set, hand it ours (and the path without
    the scheme, as RunConfig wants with an explicit filesystem)."""
    if not is_uri(location):
        return os.path.abspath(location), None
    if location.split("://", 1)[0] in ("s3", "s3a") and endpoint_from_env():
        fs, path = resolve(location)
        return path, fs
    return location, None


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return bytes(f.readall())


def size_of(location: str) -> int | None:
    """Size in bytes, None when there is no such file."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def exists(location: str) -> bool:
    return size_of(location) is not None


def list_files(location: str) -> dict[str, int]:
    """{name: size} of the files directly in a folder (one listing call on an object store); {} if none."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return {posixpath.basename(i.path): int(i.size) for i in infos if i.type == pafs.FileType.File}


def makedirs(location: str) -> None:
    if is_uri(location):
        fs, path = resolve(location)
        fs.create_dir(path, recursive=True)  # a no-op on object stores that have no folders
    else:
        os.makedirs(location, exist_ok=True)


def write_atomic(location: str, data: bytes) -> None:
    """Readers see the old file or the whole new one, never a part."""
    if not is_uri(location) or location.startswith("file://"):
        _, path = resolve(location)
        tmp = path + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as out:  # the object appears when the upload completes
        out.write(data)


def delete(location: str) -> None:
    """Remove a file if it is there."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)
