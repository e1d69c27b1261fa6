"""Stage `evaluate@ARCH`: exact top-1/top-5 error over every val image (Ray Data batch inference)."""

from __future__ import annotations

from pipeline.cli import stage_args


def main() -> None:
    def add(ap):  # noqa: ANN001
        ap.add_argument("--arch", required=True)
        ap.add_argument("--model", help="model directory (default models/ARCH)")
        ap.add_argument("--out", help="metrics JSON (default metrics/eval/ARCH.json)")

    p, args = stage_args(__doc__, add)
    from pipeline.evaluation import evaluate_model
    from pipeline.training.trainer import init_ray, write_json_atomic

    init_ray()
    result = evaluate_model(args.model or f"models/{args.arch}", p.data.shards_dir,
                            batch_size=p.eval.batch_size, ten_crop=p.eval.ten_crop)
    details = {k: result.pop(k) for k in ("per_class_top1_err", "confusion")}
    write_json_atomic(args.out or f"metrics/eval/{args.arch}.json", result)
    write_json_atomic(f"reports/eval/{args.arch}_details.json", details)
    print(f"evaluate {args.arch}: top-1 err {result['top1_err']:.2f}%, top-5 err {result['top5_err']:.2f}% "
          f"on {result['n_images']} images ({result['protocol']})")


if __name__ == "__main__":
    main()
