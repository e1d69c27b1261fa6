"""Stage `evaluate@ARCH`: exact top-1/top-5 error over every val image (Ray Data batch inference)."""

from __future__ import annotations

from pipeline.cli import arch_help, arch_name, run_main, stage_args


def main() -> None:
    def add(ap):  # noqa: ANN001
        ap.add_argument("--arch", required=True, type=arch_name, metavar="ARCH", help=arch_help())
        ap.add_argument("--model", help="model directory (default models/ARCH)")
        ap.add_argument("--out", help="metrics JSON (default metrics/eval/ARCH.json)")

    p, args = stage_args(__doc__, add)
    from pipeline.evaluation import evaluate_model, evaluate_reference, uses_ray
    from pipeline.runtime import init_ray, write_json
    from pipeline.training.checkpoint import read_model_meta

    if uses_ray(p.data.shards_dir, p.eval.ray_min_images):
        init_ray()
    model_dir = args.model or f"models/{args.arch}"
    # GPU predictors when the run trains on GPUs (their nodes may still be scaling up) or the cluster has GPUs.
    layout = {"use_gpu": p.train.use_gpu, "gpus_per_actor": p.eval.gpus_per_actor, "max_actors": p.eval.max_actors,
              "wait_for_resources_s": p.cluster.wait_for_resources_s}
    # One precision (eval.precision) for our row, its minival selection and the torchvision reference row.
    result = evaluate_model(model_dir, p.data.shards_dir, batch_size=p.eval.batch_size, ten_crop=p.eval.ten_crop,
                            ray_min_images=p.eval.ray_min_images, layout=layout, precision=p.eval.precision)
    details = {k: result.pop(k) for k in ("per_class_top1_err", "confusion")}
    result["selection"] = _selection(p, model_dir, layout)
    # The reference row: torchvision's weights for this arch, when they are on this machine, through the same
    # code, precision and transform. Not a DVC dependency (they live outside the repository), so after adding them run
    # `dvc repro --force evaluate@ARCH`.
    reference = evaluate_reference(args.arch, p.data.shards_dir, batch_size=p.eval.batch_size,
                                   ten_crop=p.eval.ten_crop, ray_min_images=p.eval.ray_min_images, layout=layout,
                                   precision=p.eval.precision,
                                   eval_transform=read_model_meta(model_dir)["eval_transform"])
    if reference is not None:
        result["torchvision_reference"] = reference
        print(f"evaluate {args.arch}: torchvision weights {reference['weights']}: "
              + (f"skipped ({reference['skipped']})" if "skipped" in reference
                 else f"top-1 err {reference['top1_err']:.2f}%, top-5 err {reference['top5_err']:.2f}%"))
    out = args.out or f"metrics/eval/{args.arch}.json"
    write_json(out, result)
    write_json(f"reports/eval/{args.arch}_details.json", details)
    _log_run(p, args.arch, result, out)
    print(f"evaluate {args.arch}: top-1 err {result['top1_err']:.2f}%, top-5 err {result['top5_err']:.2f}% "
          f"on {result['n_images']} images ({result['protocol']}, {result['precision']}, {result['runner']})")


def _selection(p, model_dir: str, layout: dict) -> dict | None:  # noqa: ANN001
    """The error the registry's champion is chosen by: the minival split (held out of train by prepare), 1-crop,
    never the val set the table reports. None when prepare carved no minival (then the newest version on the
    current data takes the alias). `in_train` says whether this model also trained on it
    (train.include_minival), which makes the comparison in-sample but still blind to val."""
    from pipeline.data.shards import read_manifest
    from pipeline.evaluation import evaluate_model

    if int((read_manifest(p.data.shards_dir)["splits"].get("minival") or {}).get("n_images", 0)) == 0:
        return None
    res = evaluate_model(model_dir, p.data.shards_dir, batch_size=p.eval.batch_size, ten_crop=False,
                         ray_min_images=p.eval.ray_min_images, layout=layout, split="minival",
                         precision=p.eval.precision)
    return {"split": "minival", "top1_err": res["top1_err"], "top5_err": res["top5_err"],
            "n_images": res["n_images"], "protocol": res["protocol"], "precision": res["precision"],
            "in_train": bool(p.train.include_minival)}


def _log_run(p, arch: str, result: dict, out: str) -> None:  # noqa: ANN001
    """An MLflow run per evaluation, in this execution's run group: the errors, the val shards as its dataset
    input (context `eval`) and the metrics JSON."""
    from pipeline import tracking
    from pipeline.data.shards import read_manifest

    manifest = read_manifest(p.data.shards_dir)
    fp = str(manifest["fingerprint"])
    run_id = tracking.start_run(p.tracking.experiment, f"evaluate-{arch}",
                                tracking.base_tags(f"evaluate@{arch}", p.digest(), fp),
                                params={"arch": arch, "protocol": result.get("protocol"), "ten_crop": p.eval.ten_crop,
                                        "precision": p.eval.precision})
    tracking.log_shards_input(run_id, manifest, p.data.shards_dir, "eval")
    tracking.log_metrics(run_id, {k: result[k] for k in ("top1_err", "top5_err") if k in result})
    tracking.log_artifact(run_id, out, "eval")
    tracking.end_run(run_id)


if __name__ == "__main__":
    run_main(main)
