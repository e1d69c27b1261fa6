"""Stage `synthesize`: write the embedded SYNTHETIC ImageNet-layout dataset (only when data.source is
synthetic; otherwise it leaves a note and the real raw_dir is read by prepare)."""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.cli import run_main, stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument("--out", default="data/synthetic"))
    from pipeline.data.synthetic import generate_synthetic_imagenet

    out = Path(args.out)
    if p.data.source != "synthetic":
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "NOT_USED.txt").write_text(f"data.source is {p.data.source}: prepare reads {p.data.raw_dir}\n")
        print(f"synthesize: skipped (data.source={p.data.source})")
        return
    s = p.data.synthetic
    generate_synthetic_imagenet(out, num_classes=s.num_classes, train_per_class=s.train_per_class,
                                val_per_class=s.val_per_class, image_size=s.image_size, seed=p.seed,
                                workers=p.data.workers)
    print(f"synthesize: {s.num_classes} SYNTHETIC classes -> {out}")


if __name__ == "__main__":
    run_main(main)
