"""Shards and checkpoints on an S3-compatible object store, against a real server on loopback.

moto's server mode (`python -m moto.server`, installed from requirements.txt) is started and stopped by this
module, on a free port; pyarrow's S3 filesystem reaches it through AWS_ENDPOINT_URL only (pyarrow itself
ignores that variable: pipeline.runtime passes it as endpoint_override), with credentials from the
environment, as on a cluster. Nothing is mocked in-process: every byte goes over HTTP to that server.

- prepare writes to s3://bucket/shards byte for byte what it writes to a local folder; start-up checks and
  verified reads work there; a killed prepare resumes there; a corrupted object is refused by name;
- the round trip: prepare -> train (1 epoch, checkpoints under s3://bucket/ray) -> evaluate on the S3 shards,
  with no credential or endpoint in the params, the manifest or MLflow; then a flipped byte in one train
  shard fails the next run naming that shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import load_params
from tests.conftest import wait_for_http

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bucket"
# Distinctive values, so the test can assert they never reach params, manifests or MLflow.
ACCESS_KEY = "AKIAPIPELINETEST18XX"
SECRET_KEY = "secret-key-that-must-never-be-logged-18"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh moto S3 server on 127.0.0.1 with one bucket; the AWS_* environment points at it."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                            "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL_S3")}
    try:
        wait_for_http(endpoint, server, f"moto server (log: {log.name})")
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_ENDPOINT_URL=endpoint,
                          AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        os.environ.pop("AWS_ENDPOINT_URL_S3", None)
        import pyarrow.fs as pafs

        # The pipeline never creates buckets (a cluster's bucket exists); the test makes its own.
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True,
                          access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1").create_dir(BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _objects(prefix: str) -> dict[str, bytes]:
    """{key below prefix: bytes} of every object under s3://BUCKET/prefix, read back over HTTP."""
    import pyarrow.fs as pafs

    from pipeline import runtime

    fs = runtime.s3_filesystem()
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path.removeprefix(f"{BUCKET}/{prefix}/")] = bytes(f.readall())
    return out


def _put(key: str, data: bytes) -> None:
    from pipeline import runtime

    runtime.write_atomic(f"s3://{BUCKET}/{key}", data)


def _local_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _prepare(raw: Path, out: str, **kw: object) -> dict:
    from pipeline.data.prepare import prepare_shards

    return prepare_shards(raw, out, max_side=64, rows_per_shard=8, workers=1, progress=False, **kw)


def test_prepare_on_s3_is_byte_identical_verified_and_resumable(s3_endpoint: str, synthetic_tree, tmp_path) -> None:
    import pipeline.data.prepare as prepare_mod
    from pipeline.data.shards import ShardChecksumError, load_split_table, read_manifest, shard_files, verify_shards

    local = tmp_path / "local"
    reference = _prepare(synthetic_tree, str(local))
    uri = f"s3://{BUCKET}/prep"
    assert _prepare(synthetic_tree, uri) == reference
    remote = _objects("prep")
    shards = {k: v for k, v in remote.items() if k.endswith(".parquet")}
    assert shards and shards == {k: v for k, v in _local_tree(local).items() if k.endswith(".parquet")}
    assert remote["manifest.json"] == (local / "manifest.json").read_bytes()
    for blob in remote.values():  # credentials and endpoint come from the environment, never written down
        assert ACCESS_KEY.encode() not in blob and SECRET_KEY.encode() not in blob and s3_endpoint.encode() not in blob
    assert verify_shards(uri) == []
    files = shard_files(uri, "train")
    assert files[0] == f"{uri}/train/00000.parquet"
    assert load_split_table(uri, "train").equals(load_split_table(local, "train"))
    assert read_manifest(uri)["fingerprint"] == reference["fingerprint"]

    # Resumable there too: a run killed after two shards keeps them and writes only the rest.
    other = f"s3://{BUCKET}/resume"
    real = prepare_mod.build_shard
    calls: list[str] = []

    def dies_on_third(task, *args):
        calls.append(task.path)
        if len(calls) == 3:
            raise RuntimeError("simulated kill")
        return real(task, *args)

    prepare_mod.build_shard = dies_on_third
    try:
        with pytest.raises(RuntimeError, match="simulated kill"):
            _prepare(synthetic_tree, other)
    finally:
        prepare_mod.build_shard = real
    assert "manifest.json" not in _objects("resume")  # no manifest: readers never see half a dataset
    assert _prepare(synthetic_tree, other) == reference
    assert _objects("resume")["manifest.json"] == remote["manifest.json"]

    # A corrupted object: start-up (sizes, footers) passes, the read that fetches it refuses it by name.
    key = "prep/train/00001.parquet"
    data = bytearray(remote["train/00001.parquet"])
    data[len(data) // 2] ^= 0xFF
    _put(key, bytes(data))
    shard_files(uri, "train")
    with pytest.raises(ShardChecksumError, match=f"shard s3://{BUCKET}/{key} has sha256"):
        load_split_table(uri, "train")
    assert verify_shards(uri) == ["train/00001.parquet: sha256 differs from the manifest"]


def _round_trip_params(shards: str, storage_path: str, **train: object):
    sets = [f"data.shards_dir={shards}", f"train.storage_path={storage_path}", "train.epochs=1",
            "train.epochs_by_arch={}", "train.batch_size=16", "train.lr_warmup_epochs=0", "train.use_tuned=false",
            "train.num_workers=1", "train.cpus_per_worker=1", "train.max_failures=0", "model.archs=[resnet20]"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_params(ROOT / "params.yaml", sets)


@pytest.mark.ray
def test_ray_data_reads_s3_shards_through_the_endpoint_and_refuses_a_corrupted_one(
    s3_endpoint: str, synthetic_tree, tmp_path
) -> None:
    """The default suite's share of the round trip below: the same Ray Data read path (ingest), the same
    storage resolution for Ray's checkpoints, in seconds instead of minutes."""
    import ray

    from pipeline.data.ingest import train_dataset, val_dataset
    from pipeline.data.shards import ShardChecksumError, shard_files
    from pipeline.runtime import ray_storage

    shards = f"s3://{BUCKET}/ingest"
    manifest = _prepare(synthetic_tree, shards)
    path, fs = ray_storage(f"s3://{BUCKET}/ray")
    assert path == f"{BUCKET}/ray" and fs is not None  # Ray gets our endpoint, not its own default client
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        keys = [k for b in val_dataset(shard_files(shards, "val"), resize=36, crop=32).iter_batches(batch_size=None)
                for k in b["key"].tolist()]
        assert sorted(keys) == sorted(r["key"] for r in _rows(shards, "val"))
        assert len(keys) == manifest["splits"]["val"]["n_images"]
        bad = "ingest/train/00001.parquet"
        data = bytearray(_objects("ingest")["train/00001.parquet"])
        data[len(data) // 2] ^= 0xFF
        _put(bad, bytes(data))
        ds = train_dataset(shard_files(shards, "train"), crop=24, min_scale=0.35, seed=0)
        with pytest.raises(ShardChecksumError, match=f"shard s3://{BUCKET}/{bad} has sha256"):
            for _ in ds.iter_batches(batch_size=None):
                pass
    finally:
        ray.shutdown()


def _rows(shards: str, split: str) -> list[dict]:
    from pipeline.data.shards import load_split_table

    return load_split_table(shards, split).select(["key"]).to_pylist()


@pytest.mark.ray
# Slow (~1-4 min on the shared 2-core machine: two Ray Train runs and Ray Data batch inference); the tests above
# cover the same storage, read and verification code in the default suite.
@pytest.mark.slow
def test_prepare_train_evaluate_round_trip_on_s3(s3_endpoint: str, synthetic_tree, tmp_path, monkeypatch) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.data.shards import ShardChecksumError
    from pipeline.evaluation import evaluate_model
    from pipeline.training.trainer import train_arch

    if ray.is_initialized():
        ray.shutdown()  # the local Ray must start with this module's AWS_* environment
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    shards = f"s3://{BUCKET}/shards"
    manifest = _prepare(synthetic_tree, shards)
    p = _round_trip_params(shards, f"s3://{BUCKET}/ray")
    try:
        final = train_arch(p, "resnet20", out_dir=tmp_path / "models" / "resnet20",
                           metrics_path=tmp_path / "train.json", curve_path=tmp_path / "curve.csv", best_path=None)
        assert final["epochs"] == 1
        checkpoints = [k for k in _objects("ray") if "checkpoint" in k]
        assert checkpoints, "no checkpoint under s3://bucket/ray"
        res = evaluate_model(str(tmp_path / "models" / "resnet20"), shards, batch_size=16, ray_min_images=0)
        assert res["runner"] == "ray" and res["n_images"] == manifest["splits"]["val"]["n_images"]
        assert res["data_fingerprint"] == manifest["fingerprint"]
        run = MlflowClient(db).get_run(final["mlflow_run_id"])
        logged = json.dumps([run.data.params, run.data.tags])
        assert shards in logged or f"s3://{BUCKET}/ray" in logged  # the URIs are logged ...
        for secret in (ACCESS_KEY, SECRET_KEY, s3_endpoint, s3_endpoint.split("//")[1]):
            assert secret not in logged  # ... the endpoint and credentials are not

        # A flipped byte in one train shard: the next run (another epoch count, so not a resume) fails naming it.
        bad = "shards/train/00002.parquet"
        data = bytearray(_objects("shards")["train/00002.parquet"])
        data[len(data) // 2] ^= 0xFF
        _put(bad, bytes(data))
        with pytest.raises(ShardChecksumError, match=f"shard s3://{BUCKET}/{bad} has sha256"):
            train_arch(_round_trip_params(shards, f"s3://{BUCKET}/ray", epochs=2), "resnet20",
                       out_dir=tmp_path / "models2", metrics_path=tmp_path / "t2.json", curve_path=tmp_path / "c2.csv",
                       best_path=None)
    finally:
        ray.shutdown()
    assert hashlib.sha256(bytes(data)).hexdigest() != manifest["splits"]["train"]["shards"][2]["sha256"]
