"""Top-k counting, the champion rule and the table rows: exact, pure."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation import REFERENCE, error_pct, table_rows, topk_correct
from pipeline.publish import decide_champion


def test_topk_correct_counts_exactly() -> None:
    logits = torch.tensor([
        [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # target 0: top-1 hit
        [0.1, 0.5, 0.2, 0.1, 0.05, 0.05],  # target 2: 2nd -> top-5 hit only
        [0.3, 0.25, 0.2, 0.15, 0.09, 0.01],  # target 5: last -> miss
    ])
    target = torch.tensor([0, 2, 5])
    assert topk_correct(logits, target, (1, 5)) == [1, 2]
    assert error_pct(1, 3) == pytest.approx(100 * 2 / 3)


def test_topk_caps_k_at_number_of_classes() -> None:
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_correct(logits, torch.tensor([0, 1]), (1, 5)) == [0, 2]


def test_topk_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        error_pct(0, 0)


def test_champion_rule() -> None:
    assert decide_champion(10.0, "fp", None)[0]
    same = {"version": "1", "top1_err": "12.0", "data_fingerprint": "fp"}
    assert decide_champion(10.0, "fp", same)[0]
    moved, why = decide_champion(13.0, "fp", same)
    assert not moved and "does not beat" in why
    assert not decide_champion(12.0, "fp", same)[0]  # a tie keeps the champion
    assert decide_champion(13.0, "other", same)[0]  # other data: not comparable


def test_table_rows_order_and_reference() -> None:
    evals = [
        {"arch": "resnet50", "top1_err": 10.0, "top5_err": 1.0, "n_images": 200, "num_classes": 10, "protocol": "p"},
        {"arch": "resnet18", "top1_err": 20.0, "top5_err": 2.0, "n_images": 200, "num_classes": 10, "protocol": "p"},
    ]
    rows = table_rows(evals, {"resnet18": {"epochs": 3, "train_time_s": 5.0, "images_per_s": 100.0}},
                      {"resnet18": 11_181_642, "resnet50": 23_528_522})
    assert [r["arch"] for r in rows] == ["resnet18", "resnet50"]
    assert rows[0]["chance_top1_err"] == pytest.approx(90.0)
    assert rows[0]["cheatsheet_top1_err"] == REFERENCE["resnet18"]["cheat_top1"]
    assert rows[0]["diff_top1_vs_cheatsheet"] == pytest.approx(20.0 - 30.24)
    assert rows[1]["epochs"] is None
