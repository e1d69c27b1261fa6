"""The register stage: every trained model becomes an MLflow registered version with a model card; the
`champion` alias moves only to a version that beats the current champion on the same data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Params
from pipeline.data.shards import dataset_name
from pipeline.data.transforms import MEAN, STD

if TYPE_CHECKING:
    from pipeline.data.shards import Manifest


class InferenceModel(nn.Module):
    """What the registry stores: float32 pixels in [0, 255], (N, 3, H, W) -> class probabilities
    (N, num_classes). H and W are dynamic in the exported program: the eval resize + center crop of the model's
    metadata (`eval_transform`) is the size it was evaluated at, and any other size the network accepts (a
    FixRes-style higher test resolution, a client's own images) runs too. Normalisation lives inside the model
    so a serving client only resizes and crops."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std  # (N, 3, H, W)
        logits = self.model(x)  # (N, C)
        return logits.softmax(dim=1)


def example_batch(shards_dir: str, resize: int, crop: int, n: int = 2) -> np.ndarray:
    """`n` real val images after the eval transform, float32 (n, 3, crop, crop): the input example.
    n >= 2 keeps the exported batch dimension dynamic."""
    from pipeline.data.shards import read_shard, shard_files
    from pipeline.data.transforms import val_image

    table = read_shard(shard_files(shards_dir, "val", verify=False)[0], columns=["image"])
    images = table.column("image").to_pylist()[:n]
    return np.stack([val_image(b, resize, crop) for b in images]).astype(np.float32)


PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016 (arXiv:1512.03385)"
# What a serving client sends and gets back (README "Serving"): documented once, shown in every model card.
REQUEST_FORMAT = ('POST /invocations {"inputs": [[[[...]]]]}: float32 pixels 0-255, (N, 3, H, W), RGB, any H and '
                  'W (the eval resize + center crop gives the evaluated size) -> '
                  '{"predictions": [[p_0, ..., p_C-1], ...]}')


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}%"


def model_card(
    arch: str, meta: dict[str, Any], ev: dict[str, Any], dataset: str,
    manifest: Manifest | None = None, lineage: dict[str, str] | None = None,
) -> str:
    """The registered version's description (Markdown): metrics, data, recipe, input/output, lineage and
    references, all read from the self-describing model dir (`meta`), the evaluation JSON and the manifest."""
    from pipeline.references import matched_reference, references_for

    config = meta.get("config", {})
    tp = config.get("train", {})
    tf = meta["eval_transform"]
    crop = tf["crop"]
    num_classes = int(ev.get("num_classes", meta.get("num_classes", 0)))
    chance = 100.0 * (1 - 1 / num_classes) if num_classes else None
    synthetic = dataset == "synthetic"
    title = f"# {arch} on {dataset}" + (" (SYNTHETIC data: its errors are not ImageNet numbers)" if synthetic else "")
    lines = [title, "", f"{arch} (ResNet family, {PAPER}) trained and evaluated by resnet-pipeline.", "",
             "## Metrics",
             f"- top-1 error {_pct(ev['top1_err'])}, top-5 error {_pct(ev['top5_err'])} on {ev['n_images']} val "
             f"images, {num_classes} classes, protocol: {ev.get('protocol', 'n/a')}, precision: "
             f"{ev.get('precision', 'not recorded')} (eval.precision).",
             f"- chance-level top-1 error: {_pct(chance)}.", "", "## Data"]
    if manifest is not None:
        n_train = manifest.get("splits", {}).get("train", {}).get("n_images", "?")
        n_val = manifest.get("splits", {}).get("val", {}).get("n_images", "?")
        n_mini = int(manifest.get("splits", {}).get("minival", {}).get("n_images", 0))
        lines.append(f"- dataset `{dataset}` (source layout `{manifest['source']['layout']}`): {n_train} train / "
                     f"{n_val} val images, {manifest.get('num_classes')} classes.")
        if n_mini:  # the lr was selected on minival, held out of train; say what the final model trained on
            full = tp.get("include_minival", True)
            lines.append(f"- trained on {'train + minival: the full train set' if full else 'train minus minival'} "
                         f"({int(n_train) + n_mini if full else n_train} images); the {n_mini} minival images "
                         "(held out of train by prepare) chose the learning rate, the val set chose nothing.")
    eval_fp = str(ev.get("data_fingerprint") or (manifest or {}).get("fingerprint") or meta.get("data_fingerprint"))
    train_fp = str(meta.get("data_fingerprint"))
    lines.append(f"- data fingerprint (evaluation) `{eval_fp}`"
                 + ("; trained on the same data." if train_fp == eval_fp else f"; trained on OTHER data `{train_fp}`."))
    norm_wd = tp.get("norm_weight_decay")
    lr = meta.get("lr", tp.get("lr"))
    lr_text = "n/a" if lr is None else f"{float(lr):.4g}"
    warmup = meta.get("lr_warmup_epochs", tp.get("lr_warmup_epochs"))
    if tp.get("lr_scheduler") == "step":
        schedule = f"step (every {tp.get('lr_step_size')} epochs x {tp.get('lr_gamma')})"
    else:
        schedule = f"{tp.get('lr_scheduler')} (to lr {tp.get('lr_min')})"
    lines += [
        "", "## Recipe",
        f"- {meta.get('epochs_trained')} of {tp.get('epochs')} epochs; {str(tp.get('opt', '')).upper()} lr "
        f"{lr_text} (global batch {tp.get('batch_size')}), momentum {tp.get('momentum')}, "
        f"nesterov {tp.get('nesterov')}, weight decay {tp.get('weight_decay')} "
        f"(norm/bias: {tp.get('weight_decay') if norm_wd is None else norm_wd}), label smoothing "
        f"{tp.get('label_smoothing')}.",
        f"- schedule {schedule}, warmup {warmup} epochs; amp {tp.get('amp')}; "
        f"EMA decay {tp.get('model_ema_decay')}; mixup {tp.get('mixup_alpha')} / cutmix {tp.get('cutmix_alpha')}; "
        f"auto augment {tp.get('auto_augment')}; random erase {tp.get('random_erase', 0.0)}; repeated augmentation "
        f"{tp.get('ra_reps') if tp.get('ra_sampler') else 'off'}; train crop {tp.get('train_crop_size')} "
        f"(min scale {tp.get('train_crop_min_scale')}"
        + (f", progressive from {tp['prog_resize_min_size']}" if tp.get("prog_resize_min_size") else "")
        + f"); deterministic {tp.get('deterministic', False)}.",
        f"- model options: {meta.get('model_kwargs', {}) or 'defaults'}; seed {config.get('seed')}.",
        "", "## Input and output",
        f"- input: float32 RGB pixels 0-255, (N, 3, H, W) of any size the network accepts; evaluated at "
        f"(N, 3, {crop}, {crop}), after resize {tf['resize']} "
        f"({tf.get('interpolation', 'bilinear')}, antialias {tf.get('antialias', True)}) + center crop {crop}; "
        "the model normalises them itself.",
        f"- output: class probabilities (N, {num_classes}), columns in the order of the model's metadata "
        "`classes` (names in `class_names`).",
        f"- serving: {REQUEST_FORMAT}.",
        "", "## Lineage",
        f"- git commit `{meta.get('git_commit')}`"
        + "".join(f"; {k} `{v}`" for k, v in (lineage or {}).items() if v) + ".",
        "", "## References", f"- {PAPER}."]
    refs = references_for(arch)
    if refs:
        # Every published ImageNet-1k val number for this arch, each under its source and protocol; only the
        # one of this evaluation's protocol is comparable with the metrics above.
        matched = matched_reference(arch, str(ev.get("protocol", "")))
        lines.append(f"- ImageNet-1k val error of {arch}, by source and protocol"
                     + (f" (comparable with this evaluation: {matched['source']}, {matched['kind']}):"
                        if matched else " (none of this evaluation's protocol):"))
        lines += [f"  - {r['source']} ({r['kind']}, {r['origin']}): top-1 {_pct(r['top1_err'])} / top-5 "
                  f"{_pct(r['top5_err'])}" for r in refs]
    else:
        lines.append(f"- no ImageNet-1k reference numbers for {arch}.")
    return "\n".join(lines) + "\n"


def decide_champion(new_err: float | None, new_fp: str, current: dict[str, str] | None) -> tuple[bool, str]:
    """Pure rule: (move the alias?, why). `new_err` is the new version's top-1 error on the selection split
    (minival, held out of train by prepare; None when prepare carved none), never the val set whose error the
    table reports: choosing the champion on val would make its val error a selected, optimistic number.
    Better = strictly lower error on the same data; `current` holds the champion's version tags plus `version`.

    A champion evaluated on other data (another fingerprint: the dataset was re-prepared or changed), or one
    without a selection error, cannot be compared with: the version on the pipeline's current data takes the
    alias, and the reason says so. Without a minival split the newest version on the current data takes it."""
    if current is None:
        return True, "no champion yet"
    version = current.get("version")
    cur_fp = current.get("data_fingerprint", "")
    if cur_fp != new_fp:
        return True, (f"champion v{version} was evaluated on other data ({cur_fp[:8] or 'unknown'}, "
                      f"now {new_fp[:8]}): not comparable, the version on the current data takes the alias")
    if new_err is None:
        return True, "no minival split to select on: the newest version on the current data takes the alias"
    cur = current.get("select_top1_err", "")
    if cur in ("", "None"):
        return True, f"champion v{version} has no minival error: not comparable, the new version takes the alias"
    cur_err = float(cur)
    if new_err < cur_err:
        return True, f"minival top-1 {new_err:.2f}% beats champion v{version} ({cur_err:.2f}%)"
    return False, f"minival top-1 {new_err:.2f}% does not beat champion v{version} ({cur_err:.2f}%)"


def top_k(probs: np.ndarray, classes: list[str], class_names: dict[str, str], k: int = 5) -> list[list[dict[str, Any]]]:
    """The served probabilities (N, C) -> per image the k most likely classes, best first, as
    {"class_id", "wnid", "name", "prob"}. `classes` / `class_names` come from the model's metadata
    (`tracking.model_metadata(uri)`)."""
    probs = np.asarray(probs, dtype=np.float64)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[{"class_id": int(i), "wnid": classes[int(i)], "name": class_names.get(classes[int(i)], ""),
              "prob": float(row[int(i)])} for i in idx] for row, idx in zip(probs, order, strict=True)]


def _read_json(path: str | Path | None) -> dict[str, Any]:
    if path is None or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def publish_model(
    p: Params, arch: str, model_dir: str | Path, eval_path: str | Path, *,
    train_metrics_path: str | Path | None = None, error_table_path: str | Path | None = None,
) -> dict[str, Any]:
    """Register models/ARCH as a new version of `{arch}-{dataset}` with tags and a model card; move the
    alias only by `decide_champion`. The register run logs the resolved config, the model's meta.json, the
    evaluation JSON and (if given and present) the error table. Returns the record for reports/registry.json."""
    from pipeline import tracking
    from pipeline.data.shards import read_manifest
    from pipeline.training.checkpoint import META_FILE, load_model_dir

    manifest = read_manifest(p.data.shards_dir)
    model, meta = load_model_dir(model_dir)
    ev = json.loads(Path(eval_path).read_text())
    fp = str(manifest["fingerprint"])
    if ev.get("data_fingerprint") and str(ev["data_fingerprint"]) != fp:
        raise ValueError(f"{eval_path} was computed on other data ({str(ev['data_fingerprint'])[:8]}) than "
                         f"{p.data.shards_dir} ({fp[:8]}): rerun the evaluate stage before registering")
    dataset = dataset_name(manifest)
    name = p.registry.model_name.format(arch=arch, dataset=dataset)
    train_run_id = str(_read_json(train_metrics_path).get("mlflow_run_id") or "")
    run_id = tracking.start_run(p.tracking.experiment, f"register-{arch}",
                                tracking.base_tags("register", p.digest(), fp),
                                params={"arch": arch, "registered_name": name, "alias": p.registry.alias})
    try:
        tracking.log_config(run_id, p.model_dump(mode="json"))
        tracking.log_artifact(run_id, Path(model_dir) / META_FILE, "model_dir")
        tracking.log_artifact(run_id, eval_path, "eval")
        if error_table_path is not None and Path(error_table_path).is_file():
            tracking.log_artifact(run_id, error_table_path, "reports")
        record = _register(p, arch, name, dataset, fp, manifest, model, meta, ev, run_id, train_run_id)
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id)
    return record


def _register(
    p: Params, arch: str, name: str, dataset: str, fp: str, manifest: Manifest, model: nn.Module,
    meta: dict[str, Any], ev: dict[str, Any], run_id: str, train_run_id: str,
) -> dict[str, Any]:
    from pipeline import tracking

    alias = p.registry.alias
    tracking.log_metrics(run_id, {"top1_err": ev["top1_err"], "top5_err": ev["top5_err"]})
    tf = meta["eval_transform"]
    example = example_batch(p.data.shards_dir, tf["resize"], tf["crop"])
    # repr() keeps every digit: the champion comparison reads these tags back and must not see a rounded value.
    version_tags = {"arch": arch, "dataset": dataset, "top1_err": repr(float(ev["top1_err"])),
                    "top5_err": repr(float(ev["top5_err"])), "n_val_images": str(ev["n_images"]),
                    "num_classes": str(meta["num_classes"]), "eval_protocol": str(ev.get("protocol", "")),
                    "eval_precision": str(ev.get("precision", "")),
                    "data_fingerprint": fp, "train_data_fingerprint": str(meta.get("data_fingerprint")),
                    "git_commit": str(meta.get("git_commit")), "params_digest": p.digest(),
                    "train_run_id": train_run_id, "epochs_trained": str(meta.get("epochs_trained"))}
    selection = ev.get("selection") or {}
    select_err = None if selection.get("top1_err") is None else float(selection["top1_err"])
    version_tags.update({"select_split": str(selection.get("split", "none")),
                         "select_top1_err": "" if select_err is None else repr(select_err)})
    # Where the evaluation data are: `python -m pipeline evaluate --model models:/...` defaults to them.
    shards_dir = p.data.shards_dir if "://" in p.data.shards_dir else str(Path(p.data.shards_dir).resolve())
    metadata = {"classes": meta["classes"], "class_names": meta.get("class_names", {}), "eval_transform": tf,
                "arch": arch, "dataset": dataset, "num_classes": meta["num_classes"], "data_fingerprint": fp,
                "shards_dir": shards_dir,
                "output": "class probabilities (N, num_classes), columns in the order of `classes`"}
    lineage = {"train run": train_run_id, "register run": run_id, "params digest": p.digest()}
    card = model_card(arch, meta, ev, dataset, manifest=manifest, lineage=lineage)
    about = (f"{arch} trained on {dataset} by resnet-pipeline. `@{alias}` is the version with the lowest top-1 "
             "error on the minival split (held out of train; never the val set) of the current data; every "
             "version's description is its model card.")
    # The model is logged into its training run, so the version's source run is the one with the curves, system
    # metrics and config; only a model whose training run is not in this store falls back to the register run.
    source_run = train_run_id if train_run_id and tracking.get_run(train_run_id) is not None else run_id
    version_tags["register_run_id"] = run_id
    version = tracking.log_and_register_model(source_run, InferenceModel(model).eval(), example, name, card,
                                              version_tags, metadata, registered_description=about)
    current = tracking.alias_version(name, alias)
    current_tags = None if current is None else {**current.tags, "version": str(current.version)}
    move, why = decide_champion(select_err, fp, current_tags)
    if move:
        tracking.set_alias(name, alias, version)
    champion = version if move else str(current.version)  # current is not None when move is False
    decision = {"champion.moved": str(move).lower(), "champion.why": why, "champion.version": champion}
    tracking.set_version_tags(name, version, decision)
    tracking.set_tags(run_id, {"registered.name": name, "registered.version": version,
                               "registered.source_run": source_run, **decision})
    return {"arch": arch, "name": name, "version": version, "alias": alias if move else None,
            "champion_moved": move, "why": why, "champion_version": champion,
            "previous_champion_version": None if current is None else str(current.version),
            "top1_err": ev["top1_err"], "top5_err": ev["top5_err"], "select_split": version_tags["select_split"],
            "select_top1_err": select_err, "data_fingerprint": fp,
            "run_id": run_id, "train_run_id": train_run_id or None, "source_run_id": source_run,
            "uri": f"models:/{name}/{version}", "champion_uri": f"models:/{name}@{alias}"}
