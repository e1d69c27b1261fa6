"""Region-of-interest JPEG decoding (pipeline.data.jpeg) and the decode-on-the-worker path
(pipeline.data.worker_decode): the same draws and the same pixels as the full-decode path, on CPU.

The ROI decoder is built by `make setup`; where it is not built these tests build it from source into a temporary
folder when a C compiler and the libjpeg headers are there (they are on CI), else they skip naming why."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2 as T  # noqa: N812 (torchvision's convention)

from pipeline.data import jpeg
from pipeline.data import transforms as tf
from tests.conftest import jpeg_bytes


@pytest.fixture(scope="module", autouse=True)
def roi_library(tmp_path_factory: pytest.TempPathFactory):
    if not jpeg.available():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None or not Path("/usr/include/jpeglib.h").exists():
            pytest.skip("ROI decoder not built and no C compiler + libjpeg headers to build it (make setup)")
        out = tmp_path_factory.mktemp("roijpeg") / "_roijpeg.so"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(jpeg.NATIVE_DIR / "roijpeg.c"),
                        "-ljpeg"], check=True)
        mp = pytest.MonkeyPatch()
        mp.setenv(jpeg.ENV_LIBRARY, str(out))
        mp.setattr(jpeg, "_load_tried", False)
        assert jpeg.available()
        yield
        mp.undo()
        return
    yield


def _full_rgb(data: bytes) -> np.ndarray:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 251)])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_region_pixels_are_the_full_decodes_pixels(size: tuple[int, int], subsampling: int) -> None:
    """Any box: the decoded window, cut to the box, is bit-identical to the same box of a full decode (rows
    skipped above, rows never decoded below, iMCU-widened columns, fancy chroma upsampling at the edges)."""
    data = jpeg_bytes(size, seed=sum(size) + subsampling, subsampling=subsampling)
    full = _full_rgb(data)
    rng = np.random.default_rng(subsampling)
    boxes = [tf.random_resized_crop_box(*size, rng, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(25)]
    boxes += [(0, 0, size[0], size[1]), (size[0] - 17, size[1] - 9, 17, 9), (1, 1, 5, 5)]
    for left, top, w, h in boxes:
        (x, y, rw, rh), _ = jpeg.region_for_box(*size, left, top, w, h, 1)
        window, x0 = jpeg.decode_region(data, x, y, rw, rh)
        assert x0 <= x and window.shape[0] == rh and x0 + window.shape[1] >= x + rw
        got = window[top - y : top - y + h, left - x0 : left - x0 + w]
        assert np.array_equal(got, full[top : top + h, left : left + w]), (left, top, w, h)


def test_scaled_region_equals_the_scaled_full_decode() -> None:
    """At 1/2..1/8 the window is the same region of libjpeg's whole scaled image (Pillow's draft decode)."""
    data = jpeg_bytes((1200, 900), seed=3)
    for denom in (2, 4, 8):
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (1200 // denom, 900 // denom))  # Pillow picks the largest scale keeping that size
        whole = np.asarray(img.convert("RGB"))
        assert whole.shape[:2][::-1] == jpeg.scaled_size(1200, 900, denom)
        window, x0 = jpeg.decode_region(data, 7, 11, 40, 30, denom)
        assert np.array_equal(window[:, 7 - x0 : 7 - x0 + 40], whole[11:41, 7:47])


def test_dct_denominator_keeps_the_box_at_least_the_crop() -> None:
    assert jpeg.dct_denom(447, 600, 224) == 1
    assert jpeg.dct_denom(448, 600, 224) == 2
    assert jpeg.dct_denom(895, 1000, 224) == 2
    assert jpeg.dct_denom(896, 1000, 224) == 4  # 896 / 4 = 224: still the crop
    assert jpeg.dct_denom(1792, 1800, 224) == 8
    assert jpeg.dct_denom(8000, 8000, 224) == 8  # libjpeg's limit


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (160, 120)])
def test_train_image_roi_equals_the_full_decode_path(size: tuple[int, int]) -> None:
    """Same seed: the same draws (the generator ends in the same state) and the same output pixels as the full
    decode + torchvision resize, within 1 level of resize round-off (the ROI window is RGBX, the full decode RGB:
    torch's uint8 antialias kernel gives both the same pixels here, 0 levels apart, but need not promise it)."""
    data = jpeg_bytes(size, seed=11)
    crop = 96 if size == (160, 120) else 224
    worst = 0
    for seed in range(12):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        roi = tf.train_image(data, crop, r1, 0.08)
        full = tf._train_image_tensor(data, size[0], size[1], crop, r2, 0.08, True)
        assert r1.random() == r2.random()  # same number of draws, same order
        assert roi.shape == full.shape == (3, crop, crop) and roi.dtype == np.uint8
        worst = max(worst, int(np.abs(roi.astype(int) - full.astype(int)).max()))
    assert worst <= 1


def test_dct_scaled_train_crop_is_close_to_the_full_decode() -> None:
    """Boxes at least twice the crop decode at 1/2..1/8: the same draws, pixels within a few levels."""
    size, crop = (1600, 1200), 224
    data = jpeg_bytes(size, seed=4)
    scaled = 0
    for seed in range(10):
        r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
        box, _ = tf.draw_train_crop(*size, np.random.default_rng(seed), 0.5, True)
        scaled += jpeg.dct_denom(box[2], box[3], crop) > 1
        roi = tf.train_image(data, crop, r1, 0.5).astype(float)
        full = tf._train_image_tensor(data, size[0], size[1], crop, r2, 0.5, True).astype(float)
        assert r1.random() == r2.random()
        assert np.abs(roi - full).mean() < 2.0
    assert scaled >= 5  # the test exercised the scaled decode


def test_val_image_of_a_large_photo_decodes_scaled_close_to_torchvision() -> None:
    data = jpeg_bytes((1200, 900), seed=8)
    ours = tf.val_image(data, 256, 224).astype(float)
    preset = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    theirs = preset(Image.open(io.BytesIO(data)).convert("RGB")).numpy().astype(float)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).mean() < 2.0


def test_corrupt_jpeg_raises_naming_libjpegs_reason() -> None:
    data = jpeg_bytes((200, 150), seed=1)
    with pytest.raises(jpeg.JpegError, match="JPEG"):
        jpeg.header(b"\xff\xd8not a jpeg at all")
    with pytest.raises(jpeg.JpegError, match="region"):
        jpeg.decode_region(data, 190, 0, 20, 10)  # outside the image
    with pytest.raises(jpeg.JpegError, match="scale"):
        jpeg.decode_region(data, 0, 0, 10, 10, denom=3)


def test_without_the_library_train_falls_back_logging_one_line(monkeypatch, caplog) -> None:
    monkeypatch.setenv(jpeg.ENV_LIBRARY, "/nonexistent/_roijpeg.so")
    monkeypatch.setattr(jpeg, "LOCAL_LIBRARY", Path("/nonexistent/local.so"))
    monkeypatch.setattr(jpeg, "SYSTEM_LIBRARY", "libroijpeg-absent.so")
    monkeypatch.setattr(jpeg, "_lib", None)
    monkeypatch.setattr(jpeg, "_load_tried", False)
    data = jpeg_bytes((320, 240), seed=2)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.jpeg"):
        outs = [tf.train_image(data, 224, np.random.default_rng(5)) for _ in range(3)]
    assert not jpeg.available()
    assert len([r for r in caplog.records if "ROI JPEG decoding unavailable" in r.getMessage()]) == 1
    full = tf._train_image_tensor(data, 320, 240, 224, np.random.default_rng(5), 0.08, True)
    assert all(np.array_equal(o, full) for o in outs)


# ------------------------------------------------------------------------- decode on the worker (CPU)


def _rows(n: int, size: tuple[int, int] = (200, 150)) -> dict[str, np.ndarray]:
    datas = np.array([jpeg_bytes(size, seed=i) for i in range(n)], dtype=object)
    return {"image": datas, "label": np.arange(n) % 3, "key": np.array([f"img{i:03d}" for i in range(n)])}


def test_worker_path_matches_decoding_in_tasks() -> None:
    """TrainDraw (in Ray Data's tasks) + WorkerDecoder (on the worker, here its CPU) produce, for the same seed,
    the same images as TrainDecode: same slices, same per-slice seeds, same draws, same ROI decode."""
    from pipeline.data.ingest import TrainDecode
    from pipeline.data.worker_decode import TrainDraw, WorkerDecoder

    batch = _rows(70)  # two slices of DECODE_BATCH (64) rows: the second slice's seed must match too
    tasks = list(TrainDecode(160, 0.08, seed=7)(batch))
    draws = list(TrainDraw(0.08, seed=7)(batch))
    assert [len(d["jpeg"]) for d in draws] == [len(t["image"]) for t in tasks] == [64, 6]
    for threads in (1, 2):
        decoder = WorkerDecoder("cpu", 160, threads=threads)
        got = [decoder.decode(d) for d in draws]
        decoder.close()
        for g, t in zip(got, tasks, strict=True):
            assert g["image"].dtype == torch.uint8 and tuple(g["image"].shape[1:]) == (3, 160, 160)
            assert np.array_equal(g["image"].numpy(), t["image"])
            assert np.array_equal(g["label"].numpy(), t["label"])


def test_worker_batches_decode_ahead_in_order_and_raise_errors() -> None:
    from pipeline.data.worker_decode import TrainDraw, WorkerDecoder

    draws = list(TrainDraw(0.08, seed=1)(_rows(24)))[0]
    source = [{k: v[i : i + 8] for k, v in draws.items()} for i in range(0, 24, 8)]
    decoder = WorkerDecoder("cpu", 64)
    got = list(decoder.batches(iter(source)))
    assert [g["label"].tolist() for g in got] == [s["label"].tolist() for s in source]
    assert all(torch.equal(g["image"], decoder.decode(s)["image"]) for g, s in zip(got, source, strict=True))
    # Post-crop augmentation applies to the decoded uint8 batch, on the worker.
    flipped = WorkerDecoder("cpu", 64, post_crop=lambda x: x.flip(-2)).decode(source[0])["image"]
    assert torch.equal(flipped, got[0]["image"].flip(-2))
    # A corrupt JPEG in the second batch: the error reaches the consumer after the first batch.
    bad = dict(source[1])
    bad["jpeg"] = np.array([b"\xff\xd8garbage"] * 8, dtype=object)
    it = decoder.batches(iter([source[0], bad, source[2]]))
    assert next(it)["label"].tolist() == source[0]["label"].tolist()
    with pytest.raises(Exception):  # noqa: B017 (PIL's or torchvision's error for undecodable bytes)
        next(it)
    # Stopping early ends the decode-ahead thread (no thread left blocked on a full queue).
    it = decoder.batches(iter(source * 10))
    next(it)
    it.close()


def test_worker_decoder_passes_already_decoded_rows_through() -> None:
    from pipeline.data.worker_decode import WorkerDecoder

    rows = {"image": np.zeros((4, 3, 8, 8), np.uint8), "label": np.arange(4)}
    out = WorkerDecoder("cpu", 8).decode(rows)
    assert out["image"].shape == (4, 3, 8, 8) and out["label"].tolist() == [0, 1, 2, 3]


@pytest.mark.ray
def test_worker_decode_dataset_on_ray(synthetic_shards: Path) -> None:
    """train_dataset(decode="worker") on real Ray Data: one fused read+draw operator shipping bytes and boxes;
    worker_batches decodes every row once per epoch on this (CPU) worker."""
    import ray

    from pipeline.data.ingest import train_dataset
    from pipeline.data.shards import read_manifest, shard_files
    from pipeline.data.worker_decode import worker_batches

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ds = train_dataset(shard_files(synthetic_shards, "train"), crop=24, min_scale=0.35, seed=0, decode="worker")
        n_train = read_manifest(synthetic_shards)["splits"]["train"]["n_images"]
        for _epoch in range(2):
            batches = list(worker_batches(ds, batch_size=16, device="cpu", crop=24, threads=2))
            images = torch.cat([b["image"] for b in batches])
            labels = torch.cat([b["label"] for b in batches])
            assert images.shape == (n_train, 3, 24, 24) and images.dtype == torch.uint8
            assert Counter(labels.tolist()) == Counter({c: n_train // 4 for c in range(4)})
            assert images.float().std() > 1  # real pixels, not blanks
        assert "ReadParquet->MapBatches(TrainDraw)" in ds.stats()
    finally:
        ray.shutdown()


def test_training_loop_with_worker_decode_runs_in_process(synthetic_shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """train.decode=worker through the real loop (pipeline.training.loop.run_loop), no Ray: the loop takes its
    worker-decode branch, WorkerDecoder decodes every step's batch on this CPU, the epoch sees every image."""
    from pipeline.config import load_params
    from pipeline.data.shards import read_manifest
    from pipeline.data.worker_decode import WorkerDecoder
    from pipeline.training.local import InMemoryShard, InProcessSession
    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    root = Path(__file__).resolve().parents[1]
    p = load_params(root / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", "train.epochs=1", "train.batch_size=16", "train.use_tuned=false",
        "train.lr=0.05", "train.lr_warmup_epochs=0", "train.num_workers=0", "train.decode=worker",
    ])
    job = make_job(p, "resnet18", 0.05, 0, 1, None)
    job.checkpoint_dir = str(tmp_path / "ckpt")
    Path(job.checkpoint_dir).mkdir()
    shard = InMemoryShard(job.train_files, crop=32, min_scale=0.35)
    batches = list(shard.iter_batches(batch_size=16, local_shuffle_seed=3))
    assert set(batches[0]) == {"jpeg", "box", "size", "flip", "label"}  # what the worker branch must decode
    steps: list[int] = []
    real_decode = WorkerDecoder.decode

    def counting_decode(self, batch, crop=None):
        out = real_decode(self, batch, crop)
        steps.append(int(out["image"].shape[0]))
        return out

    def no_decoded_rows(*_a, **_k):
        raise AssertionError("train.decode=worker must not ask for decoded rows")

    monkeypatch.setattr(WorkerDecoder, "decode", counting_decode)
    monkeypatch.setattr(InMemoryShard, "iter_torch_batches", no_decoded_rows)
    session = InProcessSession(shard)
    run_loop(job, session)
    n_train = read_manifest(synthetic_shards)["splits"]["train"]["n_images"]
    assert sum(steps) == n_train - n_train % 16 and set(steps) == {16}
    report = session.reports[-1]
    assert report["epoch"] == 1 and np.isfinite(report["train_loss"])
