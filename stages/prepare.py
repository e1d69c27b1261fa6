"""Stage `prepare`: raw dataset -> Parquet shards + manifest.json + rejected.csv at data.shards_dir (a path or a
URI), and a byte copy of the manifest at --record: what downstream stages depend on (the dataset's identity,
every shard's size and sha256), so DVC never hashes or caches the shards themselves."""

from __future__ import annotations

import argparse

from pipeline.cli import fail, run_main, stage_args


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--verify", action="store_true", help="re-hash every shard against the manifest and exit")
    ap.add_argument("--replace", action="store_true",
                    help="allow replacing another raw dataset's complete shards at data.shards_dir")
    ap.add_argument("--record", metavar="FILE", help="also copy the manifest to this local file")


def main() -> None:
    p, args = stage_args(__doc__, _arguments)
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
        manifest = prepare_from_params(d, replace=args.replace, record=args.record)
    except DataError as exc:
        fail(str(exc))
    splits = manifest["splits"]
    print(f"prepare: {manifest['num_classes']} classes, train {splits['train']['n_images']} + minival "
          f"{splits['minival']['n_images']} (held out of train for tune), val {splits['val']['n_images']}, "
          f"rejected {manifest['rejected']} -> {d.shards_dir}")


if __name__ == "__main__":
    run_main(main)
