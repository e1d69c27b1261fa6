"""The evaluate@ARCH stage (exact top-1/top-5 error over the val shards, with Ray Data batch inference) and the
error table. The counting and the forward pass it shares with training's validation are `pipeline.metrics`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from pipeline.metrics import error_pct, eval_dtype_of, eval_logits
from pipeline.training.checkpoint import load_model_dir, model_from_blob, read_model_meta

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest


# --- the evaluate@ARCH stage: batch inference over the val shards with Ray Data ---------------------------


class _Predictor:
    """Ray Data actor: loads the model once (models/ARCH, or a weights blob sent through Ray's object store)
    onto its device, returns the top-5 class ids per image. The device is the GPU Ray gave this actor
    (`num_gpus` > 0 sets CUDA_VISIBLE_DEVICES to it), else the CPU. The forward pass is `eval_logits`, with the
    run's memory format (meta config) and `precision` (eval.precision; fp32 by default) for every row."""

    def __init__(self, threads: int, model_dir: str | None = None, blob: dict | None = None,
                 model_uri: str | None = None, precision: str = "fp32") -> None:
        torch.set_num_threads(threads)
        # One precision for every row of the table: eval.precision, whatever train.amp the run trained with, so
        # our rows and the torchvision reference row (no train config) are computed alike; bf16 logits flip ~1%
        # of top-1 predictions against fp32.
        self.amp_dtype = eval_dtype_of(precision)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A registered model (models:/NAME@ALIAS) is the published program: 0-255 float pixels -> probabilities,
        # normalisation inside; it runs as stored (fp32), on the CPU: `precision` does not apply to it.
        self.registered = None
        if model_uri is not None:
            from pipeline import tracking

            self.registered = tracking.load_registered_model(model_uri)
            self.device = torch.device("cpu")
            return
        model, meta = load_model_dir(model_dir) if blob is None else model_from_blob(blob)
        train = (meta.get("config") or {}).get("train") or {}
        self.channels_last = bool(train.get("channels_last", False))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # one batch shape: pick the fastest kernels once
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format).eval()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, C) of uint8 (N, 3, H, W) images on this predictor's device: the one forward pass
        of every row (tests compare the trained-model and reference paths through it)."""
        return eval_logits(self.model, images, channels_last=self.channels_last, amp_dtype=self.amp_dtype)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        # Ray hands out read-only views of the object store; torch wants writable memory (copied only if not).
        x = torch.from_numpy(np.require(batch["image"], requirements="W"))  # (N, 3, H, W) or (N, 10, 3, H, W) uint8
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        ten = x.ndim == 5
        if ten:
            n, crops = x.shape[:2]
            x = x.flatten(0, 1)
        if self.registered is not None:
            with torch.no_grad():
                probs = self.registered(x.float())
        else:
            probs = self.logits(x).softmax(dim=1)
        if ten:
            probs = probs.view(n, crops, -1).mean(dim=1)  # average the 10 crops' probabilities (sec. 3.4)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        return {"key": batch["key"], "label": batch["label"], "top5": top.indices.cpu().numpy().astype(np.int64)}


def is_model_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/"))


def model_meta(model: str) -> dict:
    """The description of a model directory (meta.json) or of a registered model (`models:/NAME@ALIAS`: the
    metadata it was logged with), without loading its weights."""
    if is_model_uri(model):
        from pipeline import tracking

        return tracking.model_metadata(model)
    return read_model_meta(model)


def trained_shards_dir(meta: dict) -> str | None:
    """The shards folder (or URI) the model was trained on, as recorded at export (`shards_dir`; older models:
    the run's config), else None."""
    return meta.get("shards_dir") or ((meta.get("config") or {}).get("data") or {}).get("shards_dir")


def check_model_data(model: str, meta: dict, shards_dir: str, manifest: Manifest, *, same_data: bool) -> None:
    """`same_data`: the val split must be the model's own data (equal fingerprints); otherwise (a dataset named
    by the user) only the classes must be the model's, in the model's order. DataError naming both."""
    from pipeline.data.sources import DataError

    if same_data:
        if meta.get("data_fingerprint") and meta["data_fingerprint"] != manifest["fingerprint"]:
            raise DataError(f"{model} was trained on other data than {shards_dir} (fingerprint "
                            f"{str(meta['data_fingerprint'])[:8]} != {str(manifest['fingerprint'])[:8]}): pass "
                            f"--data to evaluate it on that dataset anyway")
        return
    classes = [c["wnid"] for c in manifest["classes"]]
    if meta.get("classes") and list(meta["classes"]) != classes:
        raise DataError(f"{shards_dir} has other classes than {model}: {classes[:5]}"
                        f"{'...' if len(classes) > 5 else ''} vs {list(meta['classes'])[:5]}"
                        f"{'...' if len(meta['classes']) > 5 else ''}")


def evaluate_model(model_dir: str, shards_dir: str, *, batch_size: int, ten_crop: bool = False,
                   concurrency: int | None = None, ray_min_images: int = 0, layout: dict | None = None,
                   split: str = "val", same_data: bool = True, precision: str = "fp32") -> dict:
    """Exact top-1/top-5 error of models/ARCH (or a registered `models:/NAME@ALIAS`) over every image of `split`
    (val: the table; minival: the registry's selection), exactly once (checked against the manifest: no
    duplicates from distributed padding, none skipped). Splits of `ray_min_images` or more go through Ray Data
    batch inference (Ray must be initialised); smaller ones are evaluated in this process with the same decode
    and predictor code. `same_data=False`: data other than the model's own (same classes) is allowed.
    `precision` (eval.precision: fp32 | bf16 | fp16) is the forward pass's, the same as `evaluate_reference`'s
    for the table's reference row; a registered model runs as stored (fp32). The result records it."""
    import os

    from pipeline.data.shards import read_manifest

    # The driver needs only the description; the weights are loaded once per inference actor.
    meta = model_meta(model_dir)
    manifest = read_manifest(shards_dir)
    check_model_data(model_dir, meta, shards_dir, manifest, same_data=same_data)
    kwargs = {"model_uri": model_dir} if is_model_uri(model_dir) else {"model_dir": os.path.abspath(model_dir)}
    kwargs["precision"] = "fp32" if is_model_uri(model_dir) else precision
    return _evaluate(meta, kwargs, shards_dir, manifest,
                     batch_size=batch_size, ten_crop=ten_crop, concurrency=concurrency, ray_min_images=ray_min_images,
                     layout=layout, split=split)


def uses_ray(shards_dir: str, ray_min_images: int) -> bool:
    """Whether evaluating this val set goes through Ray (`eval.ray_min_images`)."""
    from pipeline.data.shards import read_manifest

    return int(read_manifest(shards_dir)["splits"]["val"]["n_images"]) >= ray_min_images


def evaluate_reference(arch: str, shards_dir: str, *, eval_transform: dict, batch_size: int,
                       ten_crop: bool = False, weights: str | None = None, ray_min_images: int = 0,
                       layout: dict | None = None, precision: str = "fp32") -> dict | None:
    """torchvision's pretrained `arch` (found locally, pipeline.models.pretrained) evaluated with the code and
    precision our own models get (`precision`, eval.precision: pass the same as to `evaluate_model`) and with
    that weight's own published transform (pipeline.references; V1:
    resize 256, V2: resize 232, crop 224; `eval_transform` only where the file is not a known torchvision
    one): the report's reference row. None when the weights are not on this
    machine; {"skipped": why} when the dataset is not 1000-class ImageNet (the weights' classes are
    ImageNet-1k's sorted wnids, our labels are the dataset's sorted wnids: they agree only on ImageNet-1k)."""
    from pipeline.data.shards import read_manifest
    from pipeline.models.pretrained import IMAGENET_CLASSES, find_weights, load_state_dict
    from pipeline.references import weights_transform

    path = find_weights(arch, weights)
    if path is None:
        return None
    manifest = read_manifest(shards_dir)
    if int(manifest["num_classes"]) != IMAGENET_CLASSES:
        return {"weights": path.name, "skipped": f"the dataset has {manifest['num_classes']} classes, "
                f"torchvision's weights predict the {IMAGENET_CLASSES} ImageNet-1k classes"}
    # Each weight's own published transform (V2: resize 232), not the trained model's.
    own = weights_transform(arch, path.name) or eval_transform
    meta = {"arch": arch, "num_classes": IMAGENET_CLASSES, "model_kwargs": {},
            "eval_transform": {**eval_transform, **{k: own[k] for k in ("resize", "crop")}}}
    blob = {"state_dict": load_state_dict(path), **meta}
    res = _evaluate(meta, {"blob": blob, "precision": precision}, shards_dir, manifest, batch_size=batch_size,
                    ten_crop=ten_crop, ray_min_images=ray_min_images, layout=layout)
    return {"weights": path.name,
            **{k: res[k] for k in ("top1_err", "top5_err", "n_images", "protocol", "precision")}}


def predictor_layout(resources: dict, *, use_gpu: bool, gpus_per_actor: float, max_actors: int | None,
                     concurrency: int | None = None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for batch inference. GPUs when the run trained on them
    (train.use_gpu: on an autoscaling cluster the GPU nodes may not be up yet) or the cluster has some, and
    eval.gpus_per_actor > 0; else one CPU actor per 2 CPUs. Pure (tests drive it with made-up clusters)."""
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    if gpus_per_actor > 0 and (use_gpu or gpus > 0):
        fit = int(gpus // gpus_per_actor) if gpus > 0 else 1
        actors = concurrency or max_actors or max(1, fit)
        return actors, 1.0, gpus_per_actor
    actors = concurrency or max_actors or max(1, int(cpus // 2))
    return actors, min(1.0, cpus / actors), 0.0


def _ray_predictions(files: list[str], tf: dict, ten_crop: bool, batch_size: int, predictor_kwargs: dict,
                     concurrency: int | None, layout: dict | None = None) -> Iterator[dict]:
    """Batch inference over the cluster: decode tasks feed a pool of predictor actors (GPU or CPU, see
    `predictor_layout`). The pool starts with one actor and grows to `actors` as the cluster has room, so an
    autoscaling cluster starts work on the first GPU node instead of waiting for all of them."""
    import ray
    import ray.data

    from pipeline.data.ingest import val_dataset

    layout = layout or {}
    actors, cpus, gpus = predictor_layout(
        dict(ray.cluster_resources()), use_gpu=layout.get("use_gpu", False),
        gpus_per_actor=layout.get("gpus_per_actor", 1.0), max_actors=layout.get("max_actors"), concurrency=concurrency)
    if gpus > 0:
        from pipeline.cluster import wait_for_resources

        wait_for_resources([{"CPU": cpus, "GPU": gpus}], what="evaluation's first GPU predictor",
                           keys="eval.gpus_per_actor (0 = CPU inference)",
                           timeout_s=layout.get("wait_for_resources_s", 900))
    ds = val_dataset(files, resize=tf["resize"], crop=tf["crop"], ten_crop=ten_crop)
    ds = ds.map_batches(
        _Predictor, fn_constructor_kwargs={"threads": max(1, int(cpus)), **predictor_kwargs}, batch_format="numpy",
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=cpus,
        **({"num_gpus": gpus} if gpus > 0 else {}),
    )
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


def _local_predictions(files: list[str], tf: dict, ten_crop: bool, predictor_kwargs: dict) -> Iterator[dict]:
    """The same decode function and predictor as the Ray path, called in this process, shard by shard."""
    import numpy as np

    from pipeline.data.ingest import ValDecode
    from pipeline.data.shards import read_shard

    decode = ValDecode(tf["resize"], tf["crop"], ten_crop)
    predictor = _Predictor(threads=torch.get_num_threads(), **predictor_kwargs)
    for path in files:
        table = read_shard(path, columns=["image", "label", "key"])  # sha256 checked while read
        rows = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("image", "key")}
        rows["label"] = table.column("label").to_numpy()
        for decoded in decode(rows):  # slices of ingest.DECODE_BATCH rows
            yield predictor(decoded)


def _evaluate(meta: dict, predictor_kwargs: dict, shards_dir: str, manifest: Manifest, *, batch_size: int,
              ten_crop: bool, concurrency: int | None = None, ray_min_images: int = 0,
              layout: dict | None = None, split: str = "val") -> dict:
    import numpy as np

    from pipeline.data.shards import shard_files

    tf = meta["eval_transform"]
    if split not in manifest["splits"]:
        raise ValueError(f"{shards_dir}/manifest.json has no {split!r} split (splits: {sorted(manifest['splits'])})")
    expected = int(manifest["splits"][split]["n_images"])
    files = shard_files(shards_dir, split, verify=True)  # footers now; bytes hashed as they are read
    if expected >= ray_min_images:
        batches = _ray_predictions(files, tf, ten_crop, batch_size, predictor_kwargs, concurrency, layout)
    else:
        batches = _local_predictions(files, tf, ten_crop, predictor_kwargs)
    from pipeline.progress import Progress

    # A line every 10% of the images (or minute), on the console and in `dvc repro` / `ray job logs` output.
    counted = Progress(f"evaluate {meta['arch']} {split}", expected, "img")
    keys, labels, top5 = [], [], []
    for batch in batches:
        keys.extend(batch["key"].tolist())
        counted.advance(len(batch["key"]))
        labels.append(batch["label"])
        top5.append(batch["top5"])
    if len(keys) != expected or len(set(keys)) != len(keys):
        raise RuntimeError(f"evaluation counted {len(keys)} images ({len(set(keys))} distinct); "
                           f"the manifest has {expected}")
    y = np.concatenate(labels)
    pred = np.concatenate(top5)
    hit1 = pred[:, 0] == y
    hit5 = (pred == y[:, None]).any(axis=1)
    num_classes = int(manifest["num_classes"])
    per_class = {}
    for c in manifest["classes"]:
        mask = y == c["index"]
        if mask.any():
            per_class[c["wnid"]] = round(100.0 * (1 - hit1[mask].mean()), 4)
    confusion = None
    if num_classes <= 100:
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (y, pred[:, 0]), 1)
    return {
        "arch": meta["arch"],
        "split": split,
        "runner": "ray" if expected >= ray_min_images else "in-process",
        "top1_err": error_pct(int(hit1.sum()), len(y)),
        "top5_err": error_pct(int(hit5.sum()), len(y)),
        "n_images": len(y),
        "num_classes": num_classes,
        "protocol": f"{'10-crop' if ten_crop else '1-crop'} resize {tf['resize']} crop {tf['crop']}",
        "precision": predictor_kwargs.get("precision", "fp32"),  # the forward pass's (eval.precision)
        "per_class_top1_err": per_class,
        "confusion": confusion.tolist() if confusion is not None else None,
        "data_fingerprint": manifest["fingerprint"],
        "epochs": meta.get("epochs_trained"),
    }


# --- the error table ---------------------------------------------------------------------------------------


def table_rows(evals: list[dict], trains: dict[str, dict], params_count: dict[str, int]) -> list[dict]:
    """One row per evaluated arch, ordered by depth: ours beside the reference of the same protocol (1-crop:
    torchvision V1; 10-crop: the paper's Table 2/3) and Δ = ours − that reference; other protocols' numbers are
    shown labelled, never subtracted."""
    from pipeline.references import LAYERS, delta, matched_reference, references_for

    rows = []
    for ev in evals:
        arch = ev["arch"]
        tr = trains.get(arch, {})
        tv = ev.get("torchvision_reference") or {}
        ref = matched_reference(arch, ev["protocol"])
        chance = 100.0 * (1 - 1 / ev["num_classes"])
        by_source = {f"{r['source']} ({r['kind']})": (r["top1_err"], r["top5_err"]) for r in references_for(arch)}
        rows.append({
            "arch": arch,
            "layers": LAYERS.get(arch, ""),
            "params_m": round(params_count.get(arch, 0) / 1e6, 2),
            "top1_err": round(ev["top1_err"], 2),
            "top5_err": round(ev["top5_err"], 2),
            "chance_top1_err": round(chance, 2),
            # The reference of our protocol, with its source and protocol, and Δ against it only.
            "ref_source": f"{ref['source']} ({ref['kind']}, {ref['origin']})" if ref else None,
            "ref_key": f"{ref['source']} ({ref['kind']})" if ref else None,
            "ref_top1_err": ref["top1_err"] if ref else None,
            "ref_top5_err": ref["top5_err"] if ref else None,
            "diff_top1_vs_ref": delta(ev["top1_err"], ev["protocol"], ref),
            "diff_top5_vs_ref": delta(ev["top5_err"], ev["protocol"], ref, "top5_err"),
            "references": by_source,
            # torchvision's weights re-evaluated by our code on this val set (None: not found or not ImageNet-1k),
            # with that weight's own transform and our protocol (crops) and precision.
            "torchvision_top1_err": _round_or_none(tv.get("top1_err")),
            "torchvision_top5_err": _round_or_none(tv.get("top5_err")),
            "torchvision_protocol": tv.get("protocol"),
            # The forward pass's precision (eval.precision), ours and the reference's: comparable only if equal.
            "precision": ev.get("precision"),
            "torchvision_precision": tv.get("precision") if "top1_err" in tv else None,
            "n_val_images": ev["n_images"],
            "num_classes": ev["num_classes"],
            "protocol": ev["protocol"],
            "epochs": tr.get("epochs", ev.get("epochs")),
            "train_time_s": round(tr["train_time_s"], 1) if "train_time_s" in tr else None,
            "images_per_s": round(tr["images_per_s"], 1) if "images_per_s" in tr else None,
        })
    return sorted(rows, key=lambda r: (r["layers"] if isinstance(r["layers"], int) else 10_000, r["arch"]))


def _round_or_none(v: float | None) -> float | None:
    return None if v is None else round(float(v), 2)
