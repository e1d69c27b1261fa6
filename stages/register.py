"""Stage `register`: MLflow registered versions for every trained model, `champion` alias gated on error."""

from __future__ import annotations

from pipeline.cli import stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument("--out", default="reports/registry.json"))
    from pipeline.registry import register_model
    from pipeline.training.trainer import write_json_atomic

    records = []
    for arch in p.model.archs:
        rec = register_model(p, arch, f"models/{arch}", f"metrics/eval/{arch}.json")
        records.append(rec)
        print(f"register: {rec['uri']} alias={rec['alias']} ({rec['why']})")
    write_json_atomic(args.out, records)


if __name__ == "__main__":
    main()
