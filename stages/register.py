"""Stage `register`: MLflow registered versions for every trained model, `champion` alias gated on error."""

from __future__ import annotations

import argparse

from pipeline.cli import run_main, stage_args


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out", default="reports/registry.json")
    # Logged as an artifact of each register run when present (dvc.yaml lists it as a dependency, so the
    # report stage has written it first).
    ap.add_argument("--error-table", default="reports/error_table.md")


def main() -> None:
    p, args = stage_args(__doc__, _args)
    from pipeline.publish import publish_model
    from pipeline.runtime import write_json

    records = []
    for arch in p.model.archs:
        rec = publish_model(p, arch, f"models/{arch}", f"metrics/eval/{arch}.json",
                             train_metrics_path=f"metrics/train/{arch}.json", error_table_path=args.error_table)
        records.append(rec)
        print(f"register: {rec['uri']} alias={rec['alias']} ({rec['why']})")
    write_json(args.out, records)


if __name__ == "__main__":
    run_main(main)
