"""rank_agreement: does a tune trial's ranking of learning rates predict the full run's?

On a small real dataset that ships with scikit-learn (the 1,797 8x8 handwritten digits of `load_digits`,
upscaled to 16x16), a small residual CNN with batch norm is trained at LRS (lr per 256 images, the units of
tune.lr_per_256_low/high):

- full: the paper preset's recipe shape (step x0.1 at 1/3 and 2/3 of FULL_EPOCHS, warmup 5/90 of the run,
  SGD momentum 0.9, wd 1e-4) on train + minival, scored on the held-out test split (the "val" set); the mean
  score over SEEDS (top-1 error, ties by training loss: loop.rank_score) is the ranking a search should find;
- trials, one per rule of RULES (epochs, share of train): the same recipe compressed onto the trial's epochs by
  tune's own pipeline.training.tuned.trial_recipe, no EMA, scored on minival as the loop scores trials; "preset" is the
  ImageNet presets' rule (16 of 90 epochs on a quarter of train);
- truncated (the rule before): the preset budget as the first epochs of the full schedule.

Spearman's rho between each single-seed trial ranking (one trial per lr, as tune runs) and the full ranking,
per seed; the record's value is the median over seeds for the "preset" rule (baseline: 1, perfect agreement).
Writes reports/rank_agreement.json and reports/rank_agreement.png.

    python -m bench --only rank_agreement [--quick]     # or: python -m bench.rank_agreement
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import load1, record

# lr per 256 images, x2 apart: the ImageNet presets' search range (0.025 ... 0.4) and on past this small net's
# optimum (~2-6 per 256 at batch 32) to where it fails (25.6), so the full ranking has an interior optimum.
LRS = tuple(0.025 * 2 ** k for k in range(11))
SEEDS = (0, 1, 2)
BATCH = 32
FULL_EPOCHS = 15
# Trial budgets: (epochs, share of train). "preset" is the ImageNet presets' rule (16 of 90 epochs on a quarter
# of train: 3 of 15 here, ~5% of the full run's images); the others spend more to see what buys agreement.
RULES = {"preset": (3, 0.25), "more_epochs": (5, 0.5), "all_data": (3, 1.0)}
WARMUP_SHARE = 5 / 90
OUT = Path("reports")


def digits_splits(seed: int = 0) -> dict[str, Any]:
    """train / minival / test tensors (N, 1, 16, 16) from sklearn's digits: a seeded stratified 20% test split,
    then 10% of the rest held out as minival, as prepare holds minival out of train."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.2, stratify=d.target, random_state=seed)
    train, minival = train_test_split(rest, test_size=0.1, stratify=d.target[rest], random_state=seed)
    return {k: (x[v], y[v]) for k, v in (("train", train), ("minival", minival), ("test", test))}


def _net(seed: int) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(out)) + self.short(x))

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def train_once(data: dict[str, Any], lr_per_256: float, *, epochs: int, schedule_epochs: int, step_size: int,
               warmup: int, fraction: float, fit_on: tuple[str, ...], score_on: str, seed: int) -> dict[str, float]:
    """One SGD run (lr = lr_per_256 x BATCH / 256, the step schedule of pipeline.training.schedule.lr_at built
    for `schedule_epochs`, stopped after `epochs`); (top-1 error %, rank score, final train loss) on `score_on`."""
    import torch
    import torch.nn.functional as F

    from pipeline.training.loop import rank_score
    from pipeline.training.schedule import lr_at
    from pipeline.training.tuned import lr_for_batch

    x = torch.cat([data[s][0] for s in fit_on])
    y = torch.cat([data[s][1] for s in fit_on])
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(y), generator=g)[: max(BATCH, math.ceil(fraction * len(y)))]
    x, y = x[keep], y[keep]
    net = _net(seed)
    base = lr_for_batch(lr_per_256, BATCH)
    opt = torch.optim.SGD(net.parameters(), lr=base, momentum=0.9, weight_decay=1e-4)
    steps = len(y) // BATCH
    loss_sum, seen = 0.0, 0
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(y), generator=g)
        loss_sum, seen = 0.0, 0
        for i in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + i, base_lr=base, steps_per_epoch=steps, epochs=schedule_epochs,
                                    warmup_epochs=warmup, scheduler="step", step_size=step_size, gamma=0.1)
            b = order[i * BATCH:(i + 1) * BATCH]
            # A one-pixel random shift: the augmentation keeps long runs from memorising the 1,600 images.
            xb = torch.roll(x[b], shifts=tuple(torch.randint(-1, 2, (2,), generator=g).tolist()), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(b)
            seen += len(b)
    net.eval()
    xs, ys = data[score_on]
    with torch.no_grad():
        pred = net(xs).argmax(1)
    err = 100.0 * float((pred != ys).float().mean())
    train_loss = loss_sum / max(seen, 1) if math.isfinite(loss_sum) else math.inf
    return {"top1_err": err, "score": rank_score(err, train_loss, len(ys)), "train_loss": train_loss}


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho of two score lists (ties get their mean rank); nan when either is constant."""
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float(rho) if rho == rho else math.nan


def measure(quick: bool = False) -> dict[str, Any]:
    import torch

    from pipeline.config import TrainParams
    from pipeline.training.tuned import trial_recipe

    torch.set_num_threads(1)  # a shared 2-core machine: one core
    lrs = LRS[::3] if quick else LRS  # the quick run: 4 lrs, one seed
    seeds = SEEDS[:1] if quick else SEEDS
    data = digits_splits()
    full_step = FULL_EPOCHS // 3
    full_warmup = max(1, round(WARMUP_SHARE * FULL_EPOCHS))
    train = TrainParams(epochs=FULL_EPOCHS, lr_scheduler="step", lr_step_size=full_step,
                        lr_warmup_epochs=full_warmup, epochs_by_arch={})
    t0 = time.perf_counter()
    full = {lr: [train_once(data, lr, epochs=FULL_EPOCHS, schedule_epochs=FULL_EPOCHS, step_size=full_step,
                            warmup=full_warmup, fraction=1.0, fit_on=("train", "minival"), score_on="test", seed=s)
                 for s in seeds] for lr in lrs}
    t_full = time.perf_counter() - t0
    # The full runs' ranking: mean test score over seeds (error, ties by training loss, as the loop ranks).
    full_mean = [statistics.mean(r["score"] for r in full[lr]) for lr in lrs]
    out: dict[str, Any] = {
        "dataset": "sklearn load_digits (1,797 8x8 images, 10 classes), upscaled to 16x16; stratified 20% test, "
                   "10% of the rest minival",
        "lrs_per_256": list(lrs), "batch": BATCH, "seeds": list(seeds),
        "full": {"epochs": FULL_EPOCHS, "step_size": full_step, "warmup": full_warmup, "fit_on": "train+minival",
                 "scored_on": "test", "score_mean": full_mean,
                 "top1_err_mean": [statistics.mean(r["top1_err"] for r in full[lr]) for lr in lrs],
                 "ranking": _ranking(lrs, full_mean), "wall_s": round(t_full, 1)},
        "rules": {},
    }
    # Each rule compressed by tune's own trial_recipe; "truncated" is the rule before: the preset budget as the
    # first epochs of the full schedule.
    plans = {name: (e, frac, *_compressed(trial_recipe(train, "resnet18", e)), e) for name, (e, frac) in RULES.items()}
    e, frac = RULES["preset"]
    plans["truncated"] = (e, frac, full_step, full_warmup, FULL_EPOCHS)
    for name, (epochs, frac, step, warmup, schedule_epochs) in plans.items():
        runs = {lr: [train_once(data, lr, epochs=epochs, schedule_epochs=schedule_epochs, step_size=step,
                                warmup=warmup, fraction=frac, fit_on=("train",), score_on="minival", seed=s)
                     for s in seeds] for lr in lrs}
        per_seed = [spearman([runs[lr][i]["score"] for lr in lrs], full_mean) for i in range(len(seeds))]
        out["rules"][name] = {
            "epochs": epochs, "fraction": frac, "compute_share": round(epochs * frac / FULL_EPOCHS, 3),
            "step_size": step, "warmup": warmup, "schedule_epochs": schedule_epochs, "scored_on": "minival",
            "top1_err": [[r["top1_err"] for r in runs[lr]] for lr in lrs],
            "rho_per_seed": per_seed, "rho_median": statistics.median(per_seed),
            "rho_of_seed_mean": spearman([statistics.mean(r["score"] for r in runs[lr]) for lr in lrs], full_mean),
            "ranking_seed0": _ranking(lrs, [runs[lr][0]["score"] for lr in lrs]),
        }
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def _compressed(recipe: tuple[dict[str, Any], int]) -> tuple[int, int]:
    return recipe[0]["lr_step_size"], recipe[1]


def _ranking(lrs: tuple[float, ...], scores: list[float]) -> list[float]:
    """The lrs, best (least score) first."""
    return [lr for _, lr in sorted(zip(scores, lrs, strict=True))]


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = result["lrs_per_256"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(lrs, result["full"]["top1_err_mean"], "o-", label=f"full ({result['full']['epochs']} ep, test)")
    for name, r in result["rules"].items():
        mean = [statistics.mean(v) for v in r["top1_err"]]
        ax.plot(lrs, mean, "x:" if name == "truncated" else "s--",
                label=f"trial {name}: {r['epochs']} ep x {r['fraction']} (minival; rho {r['rho_median']:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("lr per 256 images")
    ax.set_ylabel("top-1 error (%)")
    ax.set_title("digits: trial ranking vs full run", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(tmpdir: Path, quick: bool = False) -> list[dict[str, Any]]:
    load_before = load1()
    result = measure(quick)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rank_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, OUT / "rank_agreement.png")
    rules = result["rules"]
    c = rules["preset"]
    return [record(
        "rank_agreement_spearman", c["rho_median"], "Spearman rho", "perfect agreement", 1.0,
        len(result["seeds"]), [min(c["rho_per_seed"]), max(c["rho_per_seed"])], load_before=load_before,
        rho_median_by_rule={k: round(v["rho_median"], 3) for k, v in rules.items()},
        lrs_per_256=result["lrs_per_256"], full_ranking=result["full"]["ranking"],
        trial_ranking_seed0=c["ranking_seed0"], wall_s=result["wall_s"],
        settings=f"digits 16x16, batch {BATCH}, full {FULL_EPOCHS} ep vs trial {c['epochs']} ep x {c['fraction']} "
        "of train, compressed schedule (reports/rank_agreement.json)",
    )]


if __name__ == "__main__":
    recs = run(Path("."), quick="--quick" in sys.argv)
    print(json.dumps(json.loads((OUT / "rank_agreement.json").read_text()), indent=1))
    print(recs[0]["value"])
