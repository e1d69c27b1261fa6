"""Stage `tune`: one Ray Tune + ASHA search over the learning rate per 256 images (and warmup) per arch of
tune.archs, each trial a shortened full schedule scored on the minival split held out of train (never on val)
-> tune/best.json, tune/trials.csv. With train.use_tuned false no train stage takes its result: the stage writes a
stub best.json (`"used": false`) and costs nothing."""

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
    if not best.get("used", True):
        print(f"tune: skipped ({best['why']})")
    for arch, e in best["archs"].items():
        print(f"tune {arch}: best lr {e['lr_per_256']:.4g} per 256 images ({e['lr']:.4g} at trial batch "
              f"{e['batch_size']}, {e['lr_at_train_batch']:.4g} at train batch {e['train_batch_size']}), warmup "
              f"{e['lr_warmup_epochs']} of {e['trial_epochs']} trial epochs, "
              f"{best['selected_on']} top-1 err {e['selection_top1_err']:.2f}% ({e['trials']} trials, "
              f"{e['stopped_early']} stopped early)")


if __name__ == "__main__":
    run_main(main)
