"""Top-k counting, the champion rule and the table rows: exact, pure."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation import table_rows
from pipeline.metrics import error_pct, topk_correct
from pipeline.publish import decide_champion
from pipeline.references import REFERENCES, delta


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
    same = {"version": "1", "select_top1_err": "12.0", "data_fingerprint": "fp"}
    assert decide_champion(10.0, "fp", same)[0]
    moved, why = decide_champion(13.0, "fp", same)
    assert not moved and "does not beat" in why
    assert not decide_champion(12.0, "fp", same)[0]  # a tie keeps the champion
    assert decide_champion(13.0, "other", same)[0]  # other data: not comparable
    # The val error (the table's number) never chooses: a champion far better on val but worse on minival loses.
    assert decide_champion(10.0, "fp", {**same, "top1_err": "1.0"})[0]
    moved, why = decide_champion(10.0, "fp", {"version": "1", "top1_err": "1.0", "data_fingerprint": "fp"})
    assert moved and "no minival error" in why
    moved, why = decide_champion(None, "fp", same)
    assert moved and "no minival split" in why


def _ev(arch: str, top1: float, protocol: str) -> dict:
    return {"arch": arch, "top1_err": top1, "top5_err": top1 / 4, "n_images": 200, "num_classes": 1000,
            "protocol": protocol}


def test_table_rows_order_and_reference() -> None:
    evals = [_ev("resnet50", 10.0, "1-crop resize 256 crop 224"), _ev("resnet18", 20.0, "1-crop resize 256 crop 224")]
    rows = table_rows(evals, {"resnet18": {"epochs": 3, "train_time_s": 5.0, "images_per_s": 100.0}},
                      {"resnet18": 11_181_642, "resnet50": 23_528_522})
    assert [r["arch"] for r in rows] == ["resnet18", "resnet50"]
    assert rows[0]["chance_top1_err"] == pytest.approx(99.9)
    # 1-crop: against torchvision V1 (its own published acc@1 69.758 -> 30.242), labelled with its source.
    assert rows[0]["ref_top1_err"] == pytest.approx(30.242)
    assert rows[0]["diff_top1_vs_ref"] == pytest.approx(20.0 - 30.24)
    assert rows[0]["ref_source"].startswith("torchvision V1 (1-crop")
    # ResNet-50's V1 number is torchvision's 23.87, not fb.resnet.torch's 24.01 (which is labelled as such).
    assert rows[1]["ref_top1_err"] == pytest.approx(23.87)
    assert rows[1]["references"]["fb.resnet.torch (1-crop)"] == (24.01, 7.02)
    assert rows[1]["references"]["torchvision V2 (1-crop)"][0] == pytest.approx(19.142)
    assert rows[1]["epochs"] is None


def test_delta_never_across_protocols() -> None:
    """A 10-crop row is compared with the paper's 10-crop Table 3 only, a 1-crop row with a 1-crop reference."""
    ten = table_rows([_ev("resnet50", 25.0, "10-crop resize 256 crop 224")], {}, {})[0]
    one = table_rows([_ev("resnet50", 25.0, "1-crop resize 256 crop 224")], {}, {})[0]
    assert ten["ref_key"] == "paper (10-crop)" and ten["diff_top1_vs_ref"] == pytest.approx(25.0 - 22.85)
    assert ten["diff_top5_vs_ref"] == pytest.approx(6.25 - 6.71)
    assert one["ref_key"] == "torchvision V1 (1-crop)" and one["diff_top1_vs_ref"] == pytest.approx(25.0 - 23.87)
    for row in (ten, one):
        kind = row["protocol"].split()[0]
        ref = next(r for r in REFERENCES
                   if f"{r['source']} ({r['kind']})" == row["ref_key"] and r["arch"] == "resnet50")
        assert ref["kind"] == kind
    # The primitive itself refuses a cross-protocol difference.
    paper10 = next(r for r in REFERENCES if r["arch"] == "resnet50" and r["kind"] == "10-crop")
    assert delta(25.0, "1-crop resize 256 crop 224", paper10) is None
    assert delta(25.0, "p", paper10) is None  # an unknown protocol is compared with nothing
    assert table_rows([_ev("resnet50", 25.0, "p")], {}, {})[0]["diff_top1_vs_ref"] is None


def test_report_shows_delta_only_for_matched_protocol() -> None:
    from pipeline.report import render_markdown

    rows = table_rows([_ev("resnet50", 25.0, "10-crop resize 256 crop 224")], {}, {"resnet50": 25_557_032})
    md = render_markdown(rows, {"layout": "imagenet"}, [], {})
    line = next(x for x in md.splitlines() if x.startswith("| resnet50"))
    cells = [c.strip() for c in line.split("|")]
    assert cells[7].startswith("22.85 / 6.71 (paper (10-crop, He et al. 2015, Table 3))")
    assert cells[8] == "2.15 / -0.46"
    assert "23.87" in cells[9] and "(torchvision V1 (1-crop))" in cells[9]  # shown, labelled, not subtracted
    assert "-1.13" not in line and "0.99" not in line  # 25 - 23.87, 25 - 24.01: never computed
