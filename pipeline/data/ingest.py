"""Ray Data ingest: Parquet shards -> decoded, augmented uint8 batches, streamed to the training workers.

Decoding and augmentation run in `map_batches` tasks, not on the training worker, so that on a GPU node
the data CPUs and the GPU overlap. Train V2 splits the train dataset across workers
(`streaming_split(equal=True)`): each worker sees disjoint rows every epoch, the same count on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.data.augment import Augment, row_seed, size_for_epoch
from pipeline.data.transforms import DECODE_BATCH, batch_seed, batch_slices, ten_crop_images, train_image, val_image

# One Ray Data operator per pass: read a shard file and decode it in the SAME task (Ray fuses ReadParquet and
# MapBatches when the map takes whole blocks, batch_size=None, and asks for the same resources). Measured here
# (bench/bench_ingest.py, 2 cores, 500x375 JPEGs): two operators (read 0.5 CPU -> decode 0.5 CPU in 64-row
# batches) ran at ~100 img/s; the fused operator at 1 CPU per task at ~210 img/s. Two operators also cost a
# deadlock risk: a 1-CPU read task could hold the last free CPU while its decode task waited. One fused task
# needs one CPU and holds nothing while queued. Fractional CPUs are slower: 0.5 runs 4 decode tasks on 2 cores
# (~115 img/s, the same machine and run). The local Ray adds logical CPUs for data
# (pipeline.runtime.init_ray), so ingest never starves next to the training workers.
TASK_CPUS = 1.0
class TrainDecode:
    """map_batches function: JPEG bytes -> RandomResizedCrop + flip (`train_image`), then the recipe's
    post-crop augmentations (`pipeline.data.augment`: auto-augment policy, random erasing), uint8
    (N, 3, crop, crop), yielded in slices of DECODE_BATCH rows.

    The epoch reaches this function through Ray Data itself: every execution (epoch) of a Dataset runs with
    the Dataset's DataContext, whose `_execution_idx` counts the passes already completed (Ray's own
    FileShuffleConfig reseeds with it). It picks this pass's crop from `crop_sizes` (progressive resizing) and,
    with `deterministic`, seeds each row from (seed, pass, key, copy). `ra_reps` > 1 (repeated augmentation)
    yields each slice `ra_reps` times as separate blocks, each copy with its own draws."""

    def __init__(self, crop: int, min_scale: float, seed: int | None = None, keep_keys: bool = False,
                 augment: Augment | None = None, crop_sizes: Sequence[int] | None = None,
                 deterministic: bool = False, ra_reps: int = 1, epoch: int | None = None,
                 scale_range: tuple[int, int] | None = None) -> None:
        self.crop = crop
        self.min_scale = min_scale
        self.scale_range = None if scale_range is None else (int(scale_range[0]), int(scale_range[1]))
        self.seed = seed
        self.keep_keys = keep_keys  # off for training: torch batches cannot hold strings
        self.calls = 0
        self.augment = augment if augment is not None and augment.active else None
        self.crop_sizes = list(crop_sizes) if crop_sizes else None
        self.deterministic = deterministic
        if deterministic and seed is None:
            raise ValueError("TrainDecode(deterministic=True) needs a seed")
        self.ra_reps = max(int(ra_reps), 1)
        self.epoch = epoch  # None: Ray Data's pass index (tests pin it)

    def _pass(self) -> int:
        if self.epoch is not None:
            return self.epoch
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0))

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        epoch = self._pass() if (self.crop_sizes or self.deterministic) else 0
        crop = size_for_epoch(self.crop_sizes, epoch) if self.crop_sizes else self.crop
        for part in batch_slices(batch, DECODE_BATCH):
            keys = part["key"]
            for copy in range(self.ra_reps):
                images = self._decode(part["image"], keys, crop, epoch, copy)
                out = {"image": images, "label": part["label"].astype(np.int64)}
                yield {**out, "key": keys} if self.keep_keys else out

    def _decode(self, blobs: np.ndarray, keys: np.ndarray, crop: int, epoch: int, copy: int) -> np.ndarray:
        if self.deterministic:  # one Generator per row: its draws depend on the row alone, not on the scheduling
            rngs = [np.random.default_rng(row_seed(self.seed or 0, epoch, k, copy)) for k in keys]
        else:
            # seed None: fresh OS entropy per slice, so every epoch augments differently; a seed makes a single
            # pass reproducible (tests, benchmarks).
            seed = None if self.seed is None else batch_seed(self.seed, self.calls, list(keys))
            self.calls += 1
            rngs = [np.random.default_rng(seed)] * len(keys)
        images = [train_image(b, crop, rng, self.min_scale, scale_range=self.scale_range)
                  for b, rng in zip(blobs, rngs, strict=True)]
        if self.augment is not None:
            import torch

            images = [self.augment(torch.from_numpy(im), rng).numpy() for im, rng in zip(images, rngs, strict=True)]
        return np.stack(images)


class ValDecode:
    """map_batches function: JPEG bytes -> resize + center crop, uint8 (N, 3, crop, crop), or with `ten_crop`
    the paper's 10 crops (sec. 3.4), uint8 (N, 10, 3, crop, crop); keys kept."""

    def __init__(self, resize: int, crop: int, ten_crop: bool = False, keep_keys: bool = True) -> None:
        self.resize = resize
        self.crop = crop
        self.transform = ten_crop_images if ten_crop else val_image
        self.keep_keys = keep_keys  # off for validation in training: torch batches cannot hold strings

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for part in batch_slices(batch, DECODE_BATCH):
            images = np.stack([self.transform(b, self.resize, self.crop) for b in part["image"]])
            out = {"image": images, "label": part["label"].astype(np.int64)}
            yield {**out, "key": part["key"]} if self.keep_keys else out


def _configure_data_context() -> None:
    """Ray 2.60's V2 Parquet datasource (ListFiles -> ReadFilesParquetV2) reads our shards as one block
    after a ~2.5 s listing task, every epoch: 3.8-6.4 s per pass over 1,000 images vs 0.6 s with the
    file-based datasource, which also streams (first batch after 0.2 s; measured here, see README).
    Progress bars only on a terminal: in logs (CI, `ray job logs`) they are thousands of redraw lines."""
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = sys.stderr.isatty()


def _shard_datasource() -> type:
    """Ray Data's file datasource that hashes each shard while reading it (pipeline.data.shards): the read task
    fetches the whole file, checks its size and sha256 against the manifest, then parses the Parquet bytes, so
    a corrupted shard fails the run naming it, checked by whichever task reads it, and only the shards a run
    reads are ever hashed. Named "Parquet", so the fused operator is still ReadParquet->MapBatches(...)."""
    from ray.data.datasource import FileBasedDatasource

    class ShardDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = ["parquet"]

        def __init__(self, paths: list[str], *, expected: dict[str, tuple[int, str]], names: dict[str, str],
                     columns: list[str], **kw: Any) -> None:
            super().__init__(paths, **kw)
            self._expected, self._names, self._columns = expected, names, columns

        def get_name(self) -> str:
            return "Parquet"

        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            from pipeline.data.shards import check_shard_bytes, parse_shard

            loc = self._names.get(path, path)
            nbytes, sha = self._expected[path]
            data = f.read_buffer()
            check_shard_bytes(loc, memoryview(data), nbytes, sha)
            yield parse_shard(data, loc, self._columns)

    return ShardDatasource


def _read(files: Sequence[str], **kw: Any) -> Any:
    """One read block per shard file (no splitting into smaller blocks: that would unfuse read and decode).
    `files` are local paths or URIs of one dataset (pipeline.runtime resolves the filesystem)."""
    import ray.data

    from pipeline import runtime
    from pipeline.data.shards import expected_digests

    _configure_data_context()
    files = list(files)
    fs, paths = runtime.resolve_many(files)
    digests = expected_digests(files)
    source = _shard_datasource()(
        paths, filesystem=fs, expected={p: digests[f] for p, f in zip(paths, files, strict=True)},
        names=dict(zip(paths, files, strict=True)), columns=["image", "label", "key"], **kw,
    )
    return ray.data.read_datasource(source, num_cpus=TASK_CPUS, override_num_blocks=len(files))


def train_dataset(
    files: Sequence[str], *, crop: int, min_scale: float, seed: int, keep_keys: bool = False, decode: str = "tasks",
    recipe: Any = None, epochs: int = 1, n_rows: int | None = None,
) -> Any:
    """A lazy Ray Dataset over the train shards: the file order is reshuffled at every execution (epoch).

    decode "tasks" (train.decode): rows of decoded uint8 crops; "worker": rows of JPEG bytes + drawn crop
    parameters that the training worker decodes (pipeline.data.worker_decode). `recipe` (params' train section,
    pipeline.config.TrainParams) switches on its augmentations: auto_augment, random_erase, progressive resizing
    over `epochs`, repeated augmentation (ra_sampler: each image ra_reps times, the pass cut at `n_rows` so an
    epoch keeps its length) and deterministic decoding (seeded rows, Ray Data's row order preserved)."""
    from ray.data import FileShuffleConfig

    ds = _read(files, shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True))
    options = _recipe_options(recipe, crop, seed, epochs)
    if decode == "worker":
        from pipeline.data.worker_decode import TrainDraw

        decode_fn: Any = TrainDraw(min_scale)  # the recipe's post-crop keys are refused with it (TrainParams)
        reps = 1
    elif decode == "tasks":
        decode_fn = TrainDecode(crop, min_scale, keep_keys=keep_keys, **options)
        reps = decode_fn.ra_reps
    else:
        raise ValueError(f"train.decode must be 'tasks' or 'worker', got {decode!r}")
    ds = ds.map_batches(decode_fn, batch_format="numpy", batch_size=None, num_cpus=TASK_CPUS)
    if reps > 1:
        if n_rows is None:
            raise ValueError("train.ra_sampler needs the epoch's row count (n_rows) to keep the epoch's length")
        # DeiT's RASampler keeps the epoch at n samples: n / reps distinct images, each reps times. The file
        # order is reshuffled every pass, so every epoch takes another subset (prepare mixes classes in shards).
        ds = ds.limit(n_rows)
    if recipe is not None and recipe.deterministic:
        # Blocks in the order of the (seeded) file shuffle, not in the order decode tasks finish: the local
        # shuffle buffer then sees the same rows in the same order in every run.
        ds.context.execution_options.preserve_order = True
    # The whole CPU budget for this one fused operator from the start. Ray Data's per-operator reservation (on by
    # default) holds back half the budget for operators a multi-operator pipeline may need later; with one
    # operator on 2 CPUs it ran a single task for the first ~1 s of every execution (6 tasks of 0.5 s: 2.4-2.5 s
    # per pass; off: both tasks at once, 1.6 s). Set on this Dataset's own context, which Train's workers
    # receive with it; other datasets (evaluation's read -> predictor-actor pipeline) keep Ray's default.
    ds.context.op_resource_reservation_enabled = False
    return ds


def _recipe_options(recipe: Any, crop: int, seed: int, epochs: int) -> dict[str, Any]:
    """TrainDecode's recipe arguments from params' train section (none without one)."""
    if recipe is None:
        return {}
    from pipeline.data.augment import progressive_sizes

    sizes = None
    if recipe.prog_resize_min_size is not None:
        sizes = progressive_sizes(epochs, crop, recipe.prog_resize_min_size, recipe.prog_resize_ramp_start,
                                  recipe.prog_resize_ramp_end, recipe.prog_resize_step)
    return {"augment": Augment.from_train(recipe), "crop_sizes": sizes, "deterministic": recipe.deterministic,
            "seed": seed if recipe.deterministic else None, "ra_reps": recipe.ra_reps if recipe.ra_sampler else 1,
            "scale_range": recipe.train_scale_range}


def val_dataset(files: Sequence[str], *, resize: int, crop: int, ten_crop: bool = False, n_images: int = 0,
                pad_to_multiple: int = 1, keep_keys: bool = True) -> Any:
    """A lazy Ray Dataset of val images after the eval transform (1 center crop, or 10 crops), keys kept.

    With `pad_to_multiple` > 1 (the number of training workers) and the val set's `n_images`, blank rows with
    label -1 are appended so the row count divides evenly: Train's `streaming_split(equal=True)` then hands
    every rank the same number of rows and drops none (it drops the remainder otherwise). The loop counts only
    labels >= 0, so counts stay exact (torchvision's DistributedSampler pads with repeated images instead,
    which counts some twice)."""
    decode = ValDecode(resize, crop, ten_crop, keep_keys=keep_keys)
    ds = _read(files).map_batches(decode, batch_format="numpy", batch_size=None, num_cpus=TASK_CPUS)
    pad = (-n_images) % pad_to_multiple if pad_to_multiple > 1 else 0
    if pad:
        import ray.data

        shape = (10, 3, crop, crop) if ten_crop else (3, crop, crop)
        ds = ds.union(ray.data.from_items([
            {"image": np.zeros(shape, dtype=np.uint8), "label": np.int64(-1),
             **({"key": f"<pad {i}>"} if keep_keys else {})}
            for i in range(pad)
        ]))
    return ds
