"""rank_agreement: does a tune trial's ranking of learning rates predict the full run's?

On a small real dataset that ships with scikit-learn (the 1,797 8x8 handwritten digits of `load_digits`,
upscaled to 16x16), a small residual CNN with batch norm is trained at LRS (lr per 256 images, the units of
tune.lr_per_256_low/high; they span the ImageNet presets' search range 0.025-0.4 and two steps past it):

- full: the paper preset's recipe shape (step x0.1 at 1/3 and 2/3 of FULL_EPOCHS, warmup 5/90 of the run,
  SGD momentum 0.9, wd 1e-4) on train + minival, scored on the held-out test split (the "val" set); the mean
  over SEEDS is the ranking a search should find;
- trial (tune's rule, pipeline.tuning.trial_recipe): the same recipe compressed onto TRIAL_EPOCHS on
  TRIAL_FRACTION of train, no EMA, scored on minival with the loop's tie-break (loop.rank_score): 6 of 36 epochs
  on a quarter of the data, 4.2% of the full run's images (the ImageNet presets: 16 of 90 on a quarter, 4.4%);
- truncated (the rule before): the same budget as the first TRIAL_EPOCHS of the full schedule (its drops
  at epochs 1/3 and 2/3 of the full run are never reached).

Spearman's rho between each single-seed trial ranking and the full ranking, per seed; the record's value is the
median over seeds of the compressed rule's rho (baseline: 1, perfect agreement). Writes
reports/rank_agreement.json and reports/rank_agreement.png.

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

LRS = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)  # per 256 images
SEEDS = (0, 1, 2)
BATCH = 64
FULL_EPOCHS = 36
TRIAL_EPOCHS = 6  # 1/6 of the full run's epochs (the ImageNet presets: 16/90)
TRIAL_FRACTION = 0.25
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
    from pipeline.tuning import trial_recipe

    torch.set_num_threads(1)  # a shared 2-core machine: one core
    lrs = LRS[::2] if quick else LRS  # the quick run: 4 lrs
    seeds = SEEDS[:1] if quick else SEEDS
    full_epochs = 15 if quick else FULL_EPOCHS
    data = digits_splits()
    full_step = full_epochs // 3
    full_warmup = max(1, round(WARMUP_SHARE * full_epochs))
    # The trial's recipe by tune's own rule: the full run's step schedule and warmup compressed onto its epochs.
    train = TrainParams(epochs=full_epochs, lr_scheduler="step", lr_step_size=full_step, lr_warmup_epochs=full_warmup,
                        epochs_by_arch={})
    recipe, trial_warmup = trial_recipe(train, "resnet18", TRIAL_EPOCHS)
    t0 = time.perf_counter()
    full = {lr: [train_once(data, lr, epochs=full_epochs, schedule_epochs=full_epochs, step_size=full_step,
                            warmup=full_warmup, fraction=1.0, fit_on=("train", "minival"), score_on="test", seed=s)
                 for s in seeds] for lr in lrs}
    t_full = time.perf_counter() - t0
    trials: dict[str, dict[float, list[dict[str, float]]]] = {"compressed": {}, "truncated": {}}
    for lr in lrs:
        trials["compressed"][lr] = [train_once(
            data, lr, epochs=TRIAL_EPOCHS, schedule_epochs=TRIAL_EPOCHS, step_size=recipe["lr_step_size"],
            warmup=trial_warmup, fraction=TRIAL_FRACTION, fit_on=("train",), score_on="minival", seed=s)
            for s in seeds]
        trials["truncated"][lr] = [train_once(
            data, lr, epochs=TRIAL_EPOCHS, schedule_epochs=full_epochs, step_size=full_step, warmup=full_warmup,
            fraction=TRIAL_FRACTION, fit_on=("train",), score_on="minival", seed=s) for s in seeds]
    wall = time.perf_counter() - t0
    full_mean = [statistics.mean(r["top1_err"] for r in full[lr]) for lr in lrs]
    out: dict[str, Any] = {
        "dataset": "sklearn load_digits (1,797 8x8 images, 10 classes), upscaled to 16x16; stratified 20% test, "
                   "10% of the rest minival",
        "lrs_per_256": list(lrs), "batch": BATCH, "seeds": list(seeds),
        "full": {"epochs": full_epochs, "step_size": full_step, "warmup": full_warmup, "fit_on": "train+minival",
                 "scored_on": "test", "top1_err_mean": full_mean,
                 "top1_err": [[r["top1_err"] for r in full[lr]] for lr in lrs],
                 "ranking": _ranking(lrs, full_mean), "wall_s": round(t_full, 1)},
        "wall_s": round(wall, 1),
    }
    for name, runs in trials.items():
        per_seed = [spearman([runs[lr][i]["score"] for lr in lrs], full_mean) for i in range(len(seeds))]
        mean_score = [statistics.mean(r["score"] for r in runs[lr]) for lr in lrs]
        out[name] = {
            "epochs": TRIAL_EPOCHS, "fraction": TRIAL_FRACTION, "scored_on": "minival",
            "step_size": recipe["lr_step_size"] if name == "compressed" else full_step,
            "warmup": trial_warmup if name == "compressed" else full_warmup,
            "schedule_epochs": TRIAL_EPOCHS if name == "compressed" else full_epochs,
            "top1_err": [[r["top1_err"] for r in runs[lr]] for lr in lrs],
            "rho_per_seed": per_seed, "rho_median": statistics.median(per_seed),
            "rho_of_seed_mean": spearman(mean_score, full_mean),
            "ranking_seed0": _ranking(lrs, [runs[lr][0]["score"] for lr in lrs]),
        }
    return out


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
    for name in ("compressed", "truncated"):
        r = result[name]
        mean = [statistics.mean(v) for v in r["top1_err"]]
        ax.plot(lrs, mean, "s--" if name == "compressed" else "x:",
                label=f"trial, {name} (minival; median rho {r['rho_median']:.2f})")
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
    c, t = result["compressed"], result["truncated"]
    return [record(
        "rank_agreement_spearman", c["rho_median"], "Spearman rho", "perfect agreement", 1.0,
        len(result["seeds"]), [min(c["rho_per_seed"]), max(c["rho_per_seed"])], load_before=load_before,
        truncated_rho_median=t["rho_median"], truncated_rho_per_seed=t["rho_per_seed"],
        compressed_rho_per_seed=c["rho_per_seed"], lrs_per_256=result["lrs_per_256"],
        full_ranking=result["full"]["ranking"], trial_ranking_seed0=c["ranking_seed0"],
        wall_s=result["wall_s"], settings=f"digits 16x16, batch {BATCH}, full {result['full']['epochs']} ep vs "
        f"trial {TRIAL_EPOCHS} ep x {TRIAL_FRACTION} of train (reports/rank_agreement.json)",
    )]


if __name__ == "__main__":
    recs = run(Path("."), quick="--quick" in sys.argv)
    print(json.dumps(json.loads((OUT / "rank_agreement.json").read_text()), indent=1))
    print(recs[0]["value"])
