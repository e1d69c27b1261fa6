"""Stage `tune`: one Ray Tune + ASHA search over learning rate and warmup per arch of tune.archs, trials scored on
the minival split held out of train (never on val) -> tune/best.json, tune/trials.csv."""

from __future__ import annotations

from pipeline.cli import run_main, stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument("--out", default="tune"))
    from pipeline.cli import fail
    from pipeline.data.sources import DataError
    from pipeline.tuning import run_tune

    try:
        best = run_tune(p, args.out)
    except DataError as exc:  # e.g. no minival split in the manifest: one line naming the key
        fail(str(exc))
    for arch, e in best["archs"].items():
        print(f"tune {arch}: best lr {e['lr']:.4g} at batch {e['batch_size']}, warmup {e['lr_warmup_epochs']} epochs, "
              f"{best['selected_on']} top-1 err {e['selection_top1_err']:.2f}% ({e['trials']} trials, "
              f"{e['stopped_early']} stopped early)")


if __name__ == "__main__":
    run_main(main)
