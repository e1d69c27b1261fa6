"""`python -m pipeline {predict,train,evaluate,analyze}`: the seed-style command line.

    python -m pipeline predict --model models/resnet50 --image cat.jpg --topk 5
    python -m pipeline predict --model models:/resnet18-synthetic@champion --image data/synthetic/val
    python -m pipeline train --arch resnet50 --data /datasets/flowers --epochs 10   # -> runs/resnet50-flowers/
    python -m pipeline evaluate --model runs/resnet50-flowers/model   # the val split it was trained on
    python -m pipeline evaluate --model models:/resnet18-synthetic@champion --data /datasets/flowers

Expected failures (a bad parameter, a missing model or image, a refused registry model) print one `error:` line
and exit non-zero; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import DEBUG_ENV, add_debug, arch_help, arch_name, positive_int, user_errors

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _images(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"error: no images under {path}")
        return files
    if not path.is_file():
        raise SystemExit(f"error: no such image: {path}")
    return [path]


def _load_predictor(model: str, *, allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """A callable (float32 0-255 pixels (N, 3, c, c) -> probabilities) and its description."""
    import torch

    if model.startswith("models:/") or model.startswith("runs:/"):
        from pipeline import tracking

        module = tracking.load_registered_model(model, allow_pickle=allow_pickle)
        meta = tracking.model_metadata(model)

        def run_registered(x: torch.Tensor) -> torch.Tensor:
            return module(x)

        return run_registered, meta
    from pipeline.publish import InferenceModel
    from pipeline.training.checkpoint import load_model_dir

    net, meta = load_model_dir(model)
    wrapped = InferenceModel(net).eval()

    def run_local(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return wrapped(x)

    return run_local, meta


def predict(model: str, image: str, topk: int = 5, *, allow_pickle: bool = False) -> list[dict[str, Any]]:
    """One record per image: {"image", "top": [...]} or, for a file that cannot be read, {"image", "error"}, so
    one bad file in a folder does not hide the answers for the others."""
    import numpy as np
    import torch

    from pipeline.data.transforms import val_image

    run_model, meta = _load_predictor(model, allow_pickle=allow_pickle)
    tf = meta["eval_transform"]
    classes: list[str] = list(meta["classes"])
    names = _class_names(meta, classes)
    out = []
    for path in _images(Path(image)):
        try:
            pixels = val_image(path.read_bytes(), int(tf["resize"]), int(tf["crop"]))
        except Exception as exc:  # noqa: BLE001 - any decoder error is the user's file, say which
            out.append({"image": str(path), "error": f"cannot read image {path}: {exc}"})
            continue
        # A batch of 2 (the image twice): the registered pt2 program was exported with a dynamic batch >= 2.
        x = torch.from_numpy(np.stack([pixels, pixels]).astype(np.float32))
        probs = run_model(x)[0]
        top = torch.topk(probs, min(topk, probs.shape[0]))
        preds = [{"class_id": int(i), "wnid": classes[int(i)], "name": names.get(classes[int(i)], ""),
                  "prob": float(p)} for p, i in zip(top.values, top.indices, strict=True)]
        out.append({"image": str(path), "top": preds})
    return out


def _class_names(meta: dict[str, Any], classes: list[str]) -> dict[str, str]:
    names = meta.get("class_names") or {}
    return dict(names) if isinstance(names, dict) else dict(zip(classes, names, strict=False))


def _dataset_label(data: str | None) -> str:
    """The dataset part of a command-line run's folder: the --data folder's name, else the pipeline's shards."""
    if data:
        return Path(data).resolve().name or "data"
    return "shards"


def _dvc_outputs_hit(paths: list[Path]) -> tuple[Path, str] | None:
    """(path, the DVC output it falls in or holds) for the first of `paths` that overlaps an output of this
    repository's dvc.yaml; None when none does or there is no DVC project here."""
    if not Path("dvc.yaml").is_file():
        return None
    from dvc.repo import Repo

    with Repo(".") as repo:
        outs = [Path(str(o.fs_path)).resolve() for o in repo.index.outs]
    for path in paths:
        path = path.resolve()
        for out in outs:
            if path == out or out in path.parents or path in out.parents:
                return path, str(out.relative_to(Path.cwd().resolve()) if out.is_relative_to(Path.cwd().resolve())
                                 else out)
    return None


def _load(params: str, overrides: list[str] | None = None) -> Any:
    from pipeline.config import ParamsError, load_params

    try:
        return load_params(params, overrides or [])
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _dataset_overrides(params: str, data: str) -> list[str]:
    """The data.* overrides that prepare a raw dataset named on the command line into a shards folder of its
    own, never params' data.shards_dir: that one belongs to the DVC pipeline (e.g. ImageNet shards `dvc repro`
    spent hours on), and prepare would not replace it. `train --data D` and `evaluate --data D` agree on it."""
    from pipeline.data.prepare import dataset_shards_dir

    base = _load(params).data.shards_dir
    # No minival split: nothing is tuned on another dataset (tune/best.json is not applied to it).
    return [f"data.raw_dir={data}", "data.source=auto", f"data.shards_dir={dataset_shards_dir(base, data)}",
            "data.minival_per_class=0"]


def _eval_shards(params: str, data: str) -> str:
    """`evaluate --data`: a shards folder as it is; a raw dataset prepared (once) as `train --data` does."""
    from pipeline.data.prepare import prepare_from_params
    from pipeline.data.shards import ManifestError, read_manifest
    from pipeline.runtime import redact_uri

    try:
        read_manifest(data)
        return data
    except ManifestError:
        pass
    p = _load(params, _dataset_overrides(params, data))
    print(redact_uri(f"prepare: {data} -> {p.data.shards_dir}"), flush=True)
    prepare_from_params(p.data)  # a complete shards folder of the same data is kept as it is
    return p.data.shards_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("predict", help="top-k classes for an image or a folder of images")
    pr.add_argument("--model", required=True, help="models/ARCH or models:/NAME@ALIAS")
    pr.add_argument("--image", required=True, help="an image file or a folder")
    pr.add_argument("--topk", type=positive_int, default=5, help="classes listed per image (default 5)")
    pr.add_argument("--allow-pickle", action="store_true",
                    help="load a registry model that needs pickle or bundled code (runs code from the registry: "
                         "only for registries you trust)")
    tr = sub.add_parser("train", help="prepare (if needed) and train one arch outside DVC")
    tr.add_argument("--arch", required=True, type=arch_name, metavar="ARCH", help=arch_help())
    tr.add_argument("--data", help="raw dataset folder (any supported layout)")
    tr.add_argument("--epochs", type=int, help="train.epochs (default: params)")
    tr.add_argument("--batch-size", type=int, help="train.batch_size, the global batch (default: params)")
    tr.add_argument("--lr", type=float, help="train.lr; also turns train.use_tuned off (default: params)")
    tr.add_argument("--pretrained", nargs="?", const="torchvision", metavar="WEIGHTS",
                    help="fine-tune from torchvision's ImageNet weights found in torch.hub's cache (never "
                         "downloaded), or from the .pth file given")
    tr.add_argument("--params", default="params.yaml", help="parameter file (default params.yaml)")
    tr.add_argument("--out", help="this run's folder: model/, metrics.json, curve.csv and, with --data, shards/ "
                                  "(default runs/ARCH-DATASET)")
    tr.add_argument("--into-dvc-outputs", action="store_true",
                    help="allow --out (or the shards) inside an output of dvc.yaml (models/ARCH, data/shards, ...): "
                         "replaces what `dvc repro` produced")
    ev = sub.add_parser("evaluate", help="exact top-1/top-5 error of a trained model on a val split")
    ev.add_argument("--model", required=True,
                    help="a trained model directory (runs/ARCH-DATASET/model, models/ARCH) or a registered model, "
                         "models:/NAME@ALIAS")
    ev.add_argument("--data", metavar="DIR|URI",
                    help="evaluate on this dataset's val split: a shards folder (with manifest.json) or a raw "
                         "dataset, prepared as `train --data` prepares it (default: the shards the model was "
                         "trained on, recorded in its metadata)")
    ev.add_argument("--params", default="params.yaml", help="parameter file (default params.yaml)")
    ev.add_argument("--ten-crop", action="store_true", help="average the ten-crop predictions")
    an = sub.add_parser("analyze", help="residual/gradient flow, feature maps, skip contribution and summary "
                                        "of a trained model for one image (PNG, JSON, text)")
    an.add_argument("--model", required=True, help="a trained model directory, e.g. models/resnet18")
    an.add_argument("--image", required=True, help="one image file")
    an.add_argument("--out", default="reports/analysis", help="output folder (default reports/analysis)")
    an.add_argument("--layer", help="residual block of the residual-flow figure (default layer2.0 or the first)")
    for sp in (pr, tr, ev, an):
        add_debug(sp)
    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    with user_errors():
        _run(args)


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "predict":
        failed = 0
        for rec in predict(args.model, args.image, args.topk, allow_pickle=args.allow_pickle):
            if "error" in rec:
                failed += 1
                print(f"error: {rec['error']}", file=sys.stderr, flush=True)
                continue
            print(rec["image"])
            for p in rec["top"]:
                print(f"  {p['class_id']:>5}  {p['wnid']:<12} {p['prob']:.4f}  {p['name']}")
        if failed:
            raise SystemExit(1)
        return
    if args.cmd == "analyze":
        from pipeline.analysis.model_report import AnalysisInputError, analyze_model_dir

        try:
            written = analyze_model_dir(args.model, args.image, args.out, layer=args.layer)
        except (AnalysisInputError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        for what, path in written.items():
            print(f"{what:>17}: {path}")
        return
    from pipeline.config import ParamsError, load_params

    overrides = []
    if args.cmd == "train":
        run_dir = Path(args.out or Path("runs") / f"{args.arch}-{_dataset_label(args.data)}")
        if args.data:
            overrides += _dataset_overrides(args.params, args.data)
        # `is not None`: an explicit 0 must reach the schema and be refused there, not be dropped as falsy.
        if args.epochs is not None:
            overrides.append(f"train.epochs={args.epochs}")
        if args.batch_size is not None:
            overrides.append(f"train.batch_size={args.batch_size}")
        if args.lr is not None:
            overrides += [f"train.lr={args.lr}", "train.use_tuned=false"]
        if args.pretrained:
            overrides.append(f"train.pretrained={args.pretrained}")
    try:
        p = load_params(args.params, overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from pipeline.runtime import init_ray

    if args.cmd == "train":
        from pipeline.analysis.measure import gradient_stats
        from pipeline.cli import fail
        from pipeline.data.prepare import prepare_from_params
        from pipeline.models.pretrained import PretrainedNotFound
        from pipeline.training.trainer import pretrained_weights, train_arch

        try:
            pretrained_weights(p, args.arch)  # before a possibly hours-long prepare
        except PretrainedNotFound as exc:
            fail(str(exc), 2)
        written = [run_dir / "model", run_dir / "metrics.json", run_dir / "curve.csv"]
        written += [Path(p.data.shards_dir)] if args.data else []
        clash = _dvc_outputs_hit(written)
        if clash and not args.into_dvc_outputs:
            fail(f"{clash[0]} is {clash[1]}, an output of dvc.yaml: `dvc repro` owns it. Pick another --out, or "
                 "pass --into-dvc-outputs to replace it anyway", 2)
        if args.data:
            from pipeline.data.sources import DataError
            from pipeline.runtime import redact_uri

            print(redact_uri(f"prepare: {args.data} -> {p.data.shards_dir}"), flush=True)
            try:
                prepare_from_params(p.data)
            except DataError as exc:
                fail(str(exc))
        # The pipeline's tune/best.json was tuned on the pipeline's data: with other data, use the params' lr.
        final = train_arch(p, args.arch, out_dir=run_dir / "model", metrics_path=run_dir / "metrics.json",
                           curve_path=run_dir / "curve.csv", best_path=None if args.data else "tune/best.json",
                           grad_stats=gradient_stats)
        print(f"trained {args.arch}: val top-1 err {final['val_top1_err']:.2f}%")
        print(f"model: {run_dir / 'model'}  (metrics {run_dir / 'metrics.json'}, curve {run_dir / 'curve.csv'}, "
              f"MLflow run {final['mlflow_run_id']})")
        return
    from pipeline.evaluation import evaluate_model, model_meta, trained_shards_dir, uses_ray

    meta = model_meta(args.model)  # a missing model fails here, before any data is read or prepared
    shards = _eval_shards(args.params, args.data) if args.data else trained_shards_dir(meta) or p.data.shards_dir
    print(f"evaluate: {args.model} on the val split of {shards}", flush=True)
    if uses_ray(shards, p.eval.ray_min_images):
        init_ray()
    res = evaluate_model(args.model, shards, batch_size=p.eval.batch_size, ten_crop=args.ten_crop,
                         ray_min_images=p.eval.ray_min_images, same_data=not args.data, precision=p.eval.precision)
    print(f"{res['arch']}: top-1 err {res['top1_err']:.2f}%, top-5 err {res['top5_err']:.2f}% "
          f"on {res['n_images']} images ({res['protocol']}, {res['precision']})")


if __name__ == "__main__":
    main()
