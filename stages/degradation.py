"""Stage `degradation`: plain vs residual nets of two depths, one recipe, in-process (He et al. 2015, Fig. 4/6)."""

from __future__ import annotations

from pipeline.cli import run_main, stage_args


def main() -> None:
    def add(ap):  # noqa: ANN001
        ap.add_argument("--out", default="reports/degradation", help="output folder (replaced as a whole)")
        ap.add_argument("--metrics", default="metrics/degradation.json", help="DVC metrics file")

    p, args = stage_args(__doc__, add)
    from pipeline.analysis.degradation import run_degradation

    record = run_degradation(p, out_dir=args.out, metrics_path=args.metrics)
    if not record["enabled"]:
        print(f"degradation: switched off (degradation.enabled: false); wrote {args.out}/degradation.md")
        return
    finals = ", ".join(f"{arch} {m['train_top1_err']}/{m['val_top1_err']}%" for arch, m in record["models"].items())
    print(f"degradation: final train/val top-1 err {finals}; {record['budget']['wall_time_s']:.0f}s -> {args.out}")


if __name__ == "__main__":
    run_main(main)
