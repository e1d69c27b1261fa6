"""Stage `train@ARCH`: Ray Train (TorchTrainer, DDP, AMP) on the shards; resumes a killed run."""

from __future__ import annotations

from pipeline.cli import arch_help, arch_name, run_main, stage_args


def main() -> None:
    def add(ap):  # noqa: ANN001
        ap.add_argument("--arch", required=True, type=arch_name, metavar="ARCH", help=arch_help())
        ap.add_argument("--out", help="model directory (default models/ARCH)")
        ap.add_argument("--metrics", help="final metrics JSON (default metrics/train/ARCH.json)")
        ap.add_argument("--curve", help="per-epoch CSV (default plots/train/ARCH.csv)")
        ap.add_argument("--best", default="tune/best.json", help="tuned lr/warmup (used when train.use_tuned)")

    p, args = stage_args(__doc__, add)
    from pipeline.analysis.measure import gradient_stats
    from pipeline.cli import fail
    from pipeline.models.pretrained import PretrainedNotFound
    from pipeline.training.trainer import train_arch

    arch = args.arch
    try:
        final = train_arch(
            p, arch, out_dir=args.out or f"models/{arch}", metrics_path=args.metrics or f"metrics/train/{arch}.json",
            curve_path=args.curve or f"plots/train/{arch}.csv", best_path=args.best, grad_stats=gradient_stats,
        )
    except PretrainedNotFound as exc:
        fail(str(exc), 2)
    print(f"train {arch}: {final['epochs']} epochs, val top-1 err {final['val_top1_err']:.2f}%, "
          f"{final['images_per_s']:.0f} img/s, {final['wall_time_s']:.0f}s")


if __name__ == "__main__":
    run_main(main)
