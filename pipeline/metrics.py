"""Top-k counting, the evaluation forward pass and the AMP dtype: the math that training's validation and the
evaluate stage share, so that both give the same numbers.

It sits below both (`pipeline.training` and `pipeline.evaluation` import it; it imports only torch and the
ImageNet normalisation of `pipeline.data.transforms`). Pure functions: counts, not averages, so that sums across
ranks and batches are exact (torchvision's `evaluate` sums counts and checks them against the dataset).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.data.transforms import normalize


def topk_counts(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Per k, the number of samples whose target is among the top-k logits, as an int64 tensor on the logits'
    device (no host synchronisation: the training loop sums these on the GPU). Targets < 0 mark padding rows
    (equal-size val splits across ranks) and are never counted. k is capped at the number of classes; ties are
    broken by torch.topk's order."""
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"expected logits (N, C) and target (N,), got {tuple(logits.shape)}, {tuple(target.shape)}")
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = pred.eq(target.view(-1, 1)) & (target >= 0).view(-1, 1)  # (N, maxk)
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """`topk_counts` as Python ints (one host read)."""
    return [int(v) for v in topk_counts(logits, target, ks).tolist()]


def error_pct(correct: int, total: int) -> float:
    """Error in percent, as the paper's tables report it."""
    if total <= 0:
        raise ValueError("no samples counted")
    return 100.0 * (1.0 - correct / total)


def eval_logits(model: torch.nn.Module, images: torch.Tensor, *, channels_last: bool,
                amp_dtype: torch.dtype | None) -> torch.Tensor:
    """THE evaluation forward pass, shared by validation in the training loop and the evaluate stage, so both
    give the same numbers: uint8 (N, 3, H, W) on the model's device -> normalise (ImageNet mean/std) -> the
    model in eval mode under `amp_dtype` (validation: the run's train.amp; the evaluate stage: eval.precision;
    None = fp32) -> float32 logits (N, C)."""
    x = normalize(images, channels_last)
    with torch.no_grad(), torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x).float()


def amp_dtype_of(amp: str | None) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None: fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "none")


EVAL_PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def eval_dtype_of(precision: str) -> torch.dtype | None:
    """eval.precision (fp32 | bf16 | fp16) -> the autocast dtype of the evaluate stage (None: fp32)."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"eval.precision {precision!r}: expected one of {sorted(EVAL_PRECISIONS)}")
    return EVAL_PRECISIONS[precision]
