"""Stage `report`: rebuild the paper's error table -> reports/error_table.{md,csv} + figures."""

from __future__ import annotations

from pipeline.cli import run_main, stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument("--out", default="reports"))
    from pipeline.data.shards import read_manifest
    from pipeline.report import build_report

    rows = build_report("metrics/eval", "metrics/train", "plots/train", read_manifest(p.data.shards_dir), args.out,
                        details_dir="reports/eval")
    for r in rows:
        print(f"report: {r['arch']:>10}  top-1 {r['top1_err']:6.2f}%  top-5 {r['top5_err']:6.2f}%  "
              f"(chance {r['chance_top1_err']:.1f}%)")


if __name__ == "__main__":
    run_main(main)
