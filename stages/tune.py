"""Stage `tune`: Ray Tune + ASHA over learning rate and warmup -> tune/best.json, tune/trials.csv."""

from __future__ import annotations

from pipeline.cli import stage_args


def main() -> None:
    p, args = stage_args(__doc__, lambda ap: ap.add_argument("--out", default="tune"))
    from pipeline.tuning import run_tune

    best = run_tune(p, args.out)
    print(f"tune: best lr {best['lr']:.4g}, warmup {best['lr_warmup_epochs']} epochs, val top-1 err "
          f"{best['val_top1_err']:.2f}% ({best['trials']} trials, {best['stopped_early']} stopped early)")


if __name__ == "__main__":
    main()
