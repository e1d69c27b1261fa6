"""Where the pipeline runs and where its files live.

Ray: `init_ray` joins the cluster named by `RAY_ADDRESS` or starts a local Ray sized to this machine;
`worker_threads` sizes torch's intra-op pool to a worker's CPU share.

Files: a local path or a URI (s3://, gs://, file://, anything pyarrow.fs opens), one interface. `data.shards_dir`
and `train.storage_path` may be either. Endpoint and credentials come only from the environment or the cloud's
usual chain, never from params: pyarrow's S3 client reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, profiles and instance roles itself, but it ignores `AWS_ENDPOINT_URL` (apache/arrow#49643),
which boto3 and the AWS CLI honour; `s3_filesystem` passes it (or `AWS_ENDPOINT_URL_S3`) as `endpoint_override`,
so an S3-compatible store (MinIO, Ceph, R2) configured for the AWS CLI works here too. The filesystem objects
carry no secret of ours when pickled to Ray tasks: each node resolves credentials from its own environment.

Writes are atomic for readers (`write_atomic`, the only writer of finished files; `publish_dir` for
directories). Prepare writes the manifest last, so a manifest means a complete dataset either way. Writers are
exclusive: a stage holds `output_lock` on each local output for its whole run, so a second run on the same
output refuses at once naming the holder; on an object store one writer per prefix is the rule (no lock).
"""


from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import posixpath
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs as pafs


# Up to the last @ of the URI, not the first /: an unencoded S3 secret may hold a '/' (over-redacting a path that
# holds an @ is the safe side).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s'\"]+@")


def redact_uri(text: str) -> str:
    """`text` with every URI's userinfo (`scheme://user:password@host`) replaced by `***`: what may be printed or
    logged (a tracking or database URI, an S3 URI, RAY_ADDRESS may carry a password)."""
    return _USERINFO.sub(r"\1***@", text)


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


def write_atomic(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a file so that readers see the old one or the whole new one, never a part: the one atomic writer
    of the pipeline (shards, manifests, metrics, reports). Locally `.NAME.PID.tmp` is written, fsynced and renamed;
    an object store makes an object visible only when its upload completes."""
    location = str(location)
    if not is_uri(location) or location.startswith("file://"):
        _, path = resolve(location)
        head, name = os.path.split(path)
        if head:
            os.makedirs(head, exist_ok=True)
        tmp = os.path.join(head, f".{name}.{os.getpid()}.tmp")  # per process: concurrent writers never share one
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as out:  # the object appears when the upload completes
        out.write(data)


def write_json(location: str | os.PathLike[str], obj: Any) -> None:
    """`obj` as indented JSON, atomically (`write_atomic`); non-JSON values (paths, dates) as their str()."""
    write_atomic(location, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_csv(location: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Rows with the first row's keys as header, atomically (`write_atomic`)."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(location, buf.getvalue().encode())


def temp_dir_beside(out_dir: str | os.PathLike[str]) -> Path:
    """A new, uniquely named `.NAME.*.tmp` folder next to `out_dir` (same filesystem, so `publish_dir` renames
    it): two writers never share one, and `clean_stale_temps` finds a killed run's."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))


# renameat2(2)'s flag that swaps two paths in one step (Linux >= 3.15; ext4, xfs, btrfs, tmpfs, overlayfs...).
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` atomically; False where the libc or the filesystem cannot (then the caller renames)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> None:
    """Replace the local directory `out_dir` by the finished `tmp` (on the same filesystem) so that `out_dir` is
    at every moment either the old directory or the new one: the two are exchanged in one renameat2 call, then
    the old one (now at `tmp`) is removed. Where the filesystem cannot exchange, the old one is renamed aside
    first (a moment without `out_dir`)."""
    tmp, out_dir = Path(tmp), Path(out_dir)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if _exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the `.NAME.*.tmp` / `.NAME.*.old` folders a killed writer of `out_dir` left beside it. Call it only
    while holding `output_lock(out_dir)`: then no live writer owns them. Returns what was removed."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return []
    stale = [q for q in out_dir.parent.glob(f".{out_dir.name}.*") if q.suffix in (".tmp", ".old") and q.is_dir()]
    for q in stale:
        shutil.rmtree(q, ignore_errors=True)
    return stale


class OutputLocked(RuntimeError):
    """Another live run holds this output (see `output_lock`)."""


LOCK_SUFFIX = ".lock"
# Outputs this process holds, with a count: a stage that locks a folder and then calls a library function that
# locks it again must not refuse itself (flock conflicts between two descriptors of one process too).
_HELD: dict[str, int] = {}


def lock_file(location: str | os.PathLike[str]) -> Path:
    """`.NAME.lock` beside the output: beside, not inside, because `publish_dir` replaces the folder itself."""
    path = Path(os.path.abspath(location))
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(location: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `location` (a local file or folder, or a URI) exclusively while the block runs; another run that
    asks for it meanwhile gets OutputLocked at once, naming the holder (host, pid, start time).

    Local paths: `fcntl.flock` on `lock_file(location)`. The kernel drops a flock when its holder dies, kill -9
    included, so a killed run's lock file is stale, never held: the next run takes it over (and removes it when
    done). NFS: flock is emulated with POSIX locks (Linux >= 2.6.12), which the server arbitrates. Object-store URIs
    take no lock: one writer per prefix is the rule there (docs/cluster.md)."""
    text = str(location)
    if is_uri(text) and not text.startswith("file://"):
        yield
        return
    path = lock_file(resolve(text)[1] if text.startswith("file://") else text)
    key = str(path)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    # The folders made for the lock file alone go with it (a refused or failed run leaves nothing behind).
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _take_lock(path, location)
    except BaseException:
        _remove_empty(made)
        raise
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiting run then retries on a fresh file (above)
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """rmdir each folder (deepest first) that is empty; one that is not stays, and so do its parents."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _take_lock(path: Path, location: object) -> int:
    """An fd holding flock on `path` (see output_lock), or OutputLocked naming the holder."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # another run just removed the folder it had made for its lock file
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            raise OutputLocked(f"{location} is being written by another run ({holder or 'holder unknown'}): "
                               f"wait for it to finish or write elsewhere (lock file {path})") from None
        # The holder before us may have finished and removed the file between our open and our flock: then the
        # inode we locked is no longer `path`, and a third run could lock the new file. Lock what is there now.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def exit_with(pid: int) -> None:
    """A process pool's initializer (`initializer=exit_with, initargs=(os.getpid(),)`): this worker exits as soon
    as process `pid` (the stage that made the pool) ends, kill -9 included, so a killed stage leaves no workers
    behind. Needed because with the forkserver start method a worker's parent is the fork server, and the fork
    server only exits once every worker has closed the pipe it hands them, and an idle worker blocks forever on
    a call queue whose write end it holds itself. A daemon thread waits on a pidfd (Linux >= 5.3) for `pid`'s
    end, or polls it once a second where there is none."""
    import select
    import threading

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfd: poll (a reused pid within a second is the only miss)
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
                time.sleep(1.0)
        else:
            select.select([fd], [], [])  # readable when the process has ended
        os._exit(1)

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def delete(location: str) -> None:
    """Remove a file if it is there."""
    import pyarrow.fs as pafs

    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


# Logical CPUs a local Ray adds beyond the cores, for Ray Data's read/decode tasks (see init_ray).
LOCAL_DATA_CPUS = 2


def init_ray(min_cpus: float = 0) -> dict[str, float]:
    """`RAY_ADDRESS` set: join that cluster. Unset: start a local Ray sized to this machine.

    Returns `ray.cluster_resources()`. Idempotent within a process.
    """
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            cores = os.cpu_count() or 1
            ray.init(
                # Logical CPUs beyond the cores are for Ray Data's read/decode tasks: when the training
                # workers hold every core's worth of CPUs, Ray Data's budget is 0 and ingest never starts
                # (seen on 2 cores). Worker threads are set explicitly, so this does not oversubscribe torch.
                num_cpus=max(cores + LOCAL_DATA_CPUS, math.ceil(min_cpus)),
                include_dashboard=False,
                log_to_driver=True,
                # Workers import `pipeline` from the repository root.
                runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
            )
    return dict(ray.cluster_resources())


def worker_threads(cpus_per_worker: float) -> int:
    """Intra-op threads per worker: its CPU share, at least one (more threads than cores only thrash)."""
    return max(1, int(round(cpus_per_worker)))


def absolute_storage(path: str) -> str:
    """Local relative paths become absolute (Ray requires it); URIs (s3://, gs://, file://) pass through."""
    if "://" in path:
        return path
    return str(Path(path).resolve())
