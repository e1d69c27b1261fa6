"""`train.decode: worker`: Ray Data ships JPEG bytes and the drawn crop parameters; the training worker decodes.

Why: on a GPU node the CPUs that Ray Data's decode tasks need (~2 ms of a core per 224-px train image here) are
often what limits the step rate; nvJPEG (and the hardware JPEG engines of A100/H100/H200) decodes a batch on the
GPU for a fraction of that. The data tasks then only read the shards and draw each image's RandomResizedCrop box
and flip from its header (`TrainDraw`, microseconds an image): the same draws, from the same per-slice seeds, in
the same order as `TrainDecode`, so the two modes augment identically. The worker (`WorkerDecoder`) decodes each
batch while the previous step runs: on CUDA, torchvision's batched `decode_jpeg(list, device="cuda")` on a side
stream, then crop + antialiased resize + flip on the GPU; on a CPU-only worker the same batches decode on the
worker's CPU (ROI decoding, pipeline.data.jpeg, in `threads` threads: ctypes and torch's ops release the GIL), so
tests and CPU runs exercise the same plumbing.

Decoder choice: torchvision 0.29 marks `torchvision.io.decode_jpeg` deprecated in favour of TorchCodec (>= 0.16).
We build on torchvision's still: it is in the pinned torchvision wheel already (TorchCodec would be a new
dependency, and not one the GPU check's bare machine has), its CUDA path is the batched nvJPEG decode
(`decode_jpegs_cuda`) we want, and the whole call sits in `_decode_cuda`, the one place to change when
torchvision drops it. The deprecation warning is silenced there, once.

Where post-crop augmentation goes: `WorkerDecoder(post_crop=...)` takes a function of the uint8 (N, 3, crop,
crop) batch on the worker's device, applied after the crop/resize/flip and before the batch is handed to the
step (the augmentations of pipeline/data/augment.py run on uint8 tensors after the crop).
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.data import jpeg
from pipeline.data.transforms import (
    DECODE_BATCH,
    batch_seed,
    batch_slices,
    crop_jpeg_roi,
    draw_train_crop,
    resized_crop_window,
)

# Columns TrainDraw yields (the worker's input): the shard's JPEG bytes, the drawn box (left, top, w, h) on the
# full-resolution image, its size, the flip, the label.
DRAW_COLUMNS = ("jpeg", "box", "size", "flip", "label")
# Decoded batches ready ahead of the step: one being trained on, one decoded behind it.
AHEAD = 2


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG header: libjpeg's when the ROI decoder is built, else PIL's."""
    if jpeg.available():
        try:
            return jpeg.header(data)[:2]
        except jpeg.JpegError:
            pass  # PIL names the problem below
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).size


class TrainDraw:
    """map_batches function for `train.decode: worker`: per row, the train transform's random draws from the
    header's size, the JPEG bytes left as they are. Slices and seeds exactly as `TrainDecode`."""

    def __init__(self, min_scale: float, seed: int | None = None, hflip: bool = True) -> None:
        self.min_scale = min_scale
        self.seed = seed
        self.hflip = hflip
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for part in batch_slices(batch, DECODE_BATCH):
            keys = part["key"]
            seed = None if self.seed is None else batch_seed(self.seed, self.calls, list(keys))
            self.calls += 1
            rng = np.random.default_rng(seed)
            m = len(keys)
            boxes = np.empty((m, 4), dtype=np.int32)
            sizes = np.empty((m, 2), dtype=np.int32)
            flips = np.empty(m, dtype=bool)
            for i, data in enumerate(part["image"]):
                w, h = image_size(data)
                box, flip = draw_train_crop(w, h, rng, self.min_scale, self.hflip)
                boxes[i], sizes[i], flips[i] = box, (w, h), flip
            yield {"jpeg": part["image"], "box": boxes, "size": sizes, "flip": flips,
                   "label": part["label"].astype(np.int64)}


def _decode_cuda(datas: list[bytes], device: Any) -> list[Any]:
    """Batched nvJPEG decode -> list of uint8 (3, H, W) tensors on `device` (torchvision's decode_jpeg)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # module docstring: why torchvision's decoder still
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def _decode_one_cpu(data: bytes, size: tuple[int, int], box: tuple[int, int, int, int], flip: bool,
                    crop: int) -> Any:
    """One image on the CPU: ROI decode when built (bit-identical to TrainDecode's), else a full decode."""
    if jpeg.available():
        try:
            return crop_jpeg_roi(data, size[0], size[1], box, flip, crop)
        except jpeg.JpegError:
            pass  # e.g. a CMYK JPEG libjpeg cannot turn into RGB: torchvision below
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    left, top, w, h = box
    return resized_crop_window(pixels, (top, left, h, w), crop, flip)


class WorkerDecoder:
    """Decodes TrainDraw's batches on the training worker's device -> {"image": uint8 (N, 3, crop, crop),
    "label": int64 (N,)}, both on `device`."""

    def __init__(self, device: Any, crop: int, threads: int = 1,
                 post_crop: Callable[[Any], Any] | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.crop = crop
        self.threads = max(1, int(threads))
        # Post-crop augmentation (uint8 batch on the device -> same), applied before the step sees the batch.
        self.post_crop = post_crop
        self.on_cuda = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="worker-decode") if (
            not self.on_cuda and self.threads > 1) else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def decode(self, batch: dict[str, np.ndarray], crop: int | None = None) -> dict[str, Any]:
        """One batch of TrainDraw rows (or of rows already decoded by TrainDecode, passed through)."""
        import torch

        crop = self.crop if crop is None else crop
        # Copies: Ray Data's numpy batches may be read-only views of the object store.
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64)).to(self.device, non_blocking=True)
        if "jpeg" not in batch:  # a dataset built with the default train.decode: already decoded pixels
            images = torch.from_numpy(np.array(batch["image"], dtype=np.uint8)).to(self.device, non_blocking=True)
            return {"image": images, "label": labels}
        datas, boxes, sizes, flips = batch["jpeg"], batch["box"], batch["size"], batch["flip"]
        n = len(datas)
        if self.on_cuda:
            decoded = _decode_cuda(list(datas), self.device)
            outs = [resized_crop_window(img, (int(b[1]), int(b[0]), int(b[3]), int(b[2])), crop, bool(f))
                    for img, b, f in zip(decoded, boxes, flips, strict=True)]
        else:
            def one(i: int) -> Any:
                b = boxes[i]
                return _decode_one_cpu(datas[i], (int(sizes[i][0]), int(sizes[i][1])),
                                       (int(b[0]), int(b[1]), int(b[2]), int(b[3])), bool(flips[i]), crop)

            outs = list(self._pool.map(one, range(n))) if self._pool is not None else [one(i) for i in range(n)]
        images = torch.stack(outs)
        if self.post_crop is not None:
            images = self.post_crop(images)
        return {"image": images, "label": labels}

    def batches(self, source: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
        """Decoded batches of `source`, each decoded in a background thread while the caller works on the one
        before (on CUDA on a side stream; the caller's stream waits for it). The thread stops when the caller
        stops iterating."""
        import torch

        stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        ready: queue.Queue[Any] = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        end = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in source:
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            out = self.decode(batch)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        out, event = self.decode(batch), None
                    if not put((out, event)):
                        return
                put(end)
            except BaseException as e:  # noqa: BLE001 (re-raised in the consumer)
                put(e)

        thread = threading.Thread(target=produce, name="worker-decode-ahead", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                out, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in out.values():  # the side stream's memory is now used on the current stream
                        t.record_stream(current)
                yield out
        finally:
            stop.set()
            thread.join(timeout=5)


def worker_batches(shard: Any, *, batch_size: int, device: Any, crop: int, threads: int = 1,
                   local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None,
                   prefetch_batches: int = 2, drop_last: bool = True,
                   post_crop: Callable[[Any], Any] | None = None) -> Iterator[dict[str, Any]]:
    """An epoch of decoded train batches from a Ray Data shard (or Dataset) of TrainDraw rows, as the loop's
    `iter_torch_batches` would give them (uint8 images, int64 labels, on `device`)."""
    source = shard.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=local_shuffle_buffer_size, local_shuffle_seed=local_shuffle_seed,
    )
    decoder = WorkerDecoder(device, crop, threads=threads, post_crop=post_crop)
    try:
        yield from decoder.batches(source)
    finally:
        decoder.close()
