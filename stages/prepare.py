"""Stage `prepare`: raw dataset -> verified Parquet shards + manifest.json + rejected.csv."""

from __future__ import annotations

from pipeline.cli import fail, stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument(
        "--verify", action="store_true", help="re-hash every shard against the manifest and exit"))
    from pipeline.data.shards import verify_shards

    if args.verify:
        problems = verify_shards(p.data.shards_dir)
        for line in problems:
            print(line)
        if problems:
            fail(f"{len(problems)} problem(s) in {p.data.shards_dir}")
        print(f"verify: every shard in {p.data.shards_dir} matches its manifest checksum")
        return
    from pipeline.data.prepare import prepare_from_params
    from pipeline.data.sources import DataError

    d = p.data
    try:
        manifest = prepare_from_params(d)
    except DataError as exc:
        fail(str(exc))
    splits = manifest["splits"]
    print(f"prepare: {manifest['num_classes']} classes, train {splits['train']['n_images']}, "
          f"val {splits['val']['n_images']}, rejected {manifest['rejected']} -> {d.shards_dir}")


if __name__ == "__main__":
    main()
