"""Published ImageNet-1k val errors (%) the error table compares against, as data: one row per (arch, source),
each with its protocol, so that a difference is only ever taken between equal protocols.

Protocols (`kind`):
- "1-crop": one center crop `crop` after resizing the shorter side to `resize` (torchvision, fb.resnet.torch).
- "10-crop": the four corners and the center of a 224 crop, and their flips, probabilities averaged
  (He et al. 2015, sec. 3.4 and Tables 2-3).
- "multi-scale-fcn": fully-convolutional, scores averaged over shorter sides {224, 256, 384, 480, 640}
  (He et al. 2015, Table 4). Our evaluation has no such protocol, so no Δ is ever taken against it.

Origins: torchvision numbers and transforms are those of `torchvision.models.ResNet*_Weights` (`meta["_metrics"]`
and `transforms()`; tests/test_reference.py checks this table against the installed torchvision). The paper
rows are from He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385), Tables
2-4; fb.resnet.torch's from its README's "Trained ResNet models" table (single crop 224). docs/evaluation.md
transcribes the same table with its origins.
"""

from __future__ import annotations

from typing import Any

PAPER_URL = "https://arxiv.org/abs/1512.03385"
FB_URL = "https://github.com/facebookarchive/fb.resnet.torch/tree/master/pretrained"
TV_URL = "https://pytorch.org/vision/stable/models.html"

ONE_CROP, TEN_CROP, MULTI_SCALE = "1-crop", "10-crop", "multi-scale-fcn"

# torchvision's published acc@1 / acc@5 (%) and each weight's eval transform (ImageClassification: bilinear,
# antialiased resize of the shorter side, center crop). V2 exists for ResNet-50/101/152 only.
TORCHVISION = {
    ("resnet18", "IMAGENET1K_V1"): (69.758, 89.078, 256),
    ("resnet34", "IMAGENET1K_V1"): (73.314, 91.420, 256),
    ("resnet50", "IMAGENET1K_V1"): (76.130, 92.862, 256),
    ("resnet50", "IMAGENET1K_V2"): (80.858, 95.434, 232),
    ("resnet101", "IMAGENET1K_V1"): (77.374, 93.546, 256),
    ("resnet101", "IMAGENET1K_V2"): (81.886, 95.780, 232),
    ("resnet152", "IMAGENET1K_V1"): (78.312, 94.046, 256),
    ("resnet152", "IMAGENET1K_V2"): (82.284, 96.002, 232),
}

# top-1 / top-5 error (%); None where the source gives none.
FB_RESNET_TORCH = {"resnet18": (30.43, 10.76), "resnet34": (26.73, 8.74), "resnet50": (24.01, 7.02),
                   "resnet101": (22.44, 6.21), "resnet152": (22.16, 6.16)}
# Table 3 (10-crop; ResNet-34 is option B) and Table 2 (10-crop top-1 only, where Table 3 has no row).
PAPER_10CROP = {"resnet18": (27.88, None, "Table 2"), "resnet34": (24.52, 7.46, "Table 3 (34-B)"),
                "resnet50": (22.85, 6.71, "Table 3"), "resnet101": (21.75, 6.05, "Table 3"),
                "resnet152": (21.43, 5.71, "Table 3")}
PAPER_MULTI_SCALE = {"resnet34": (21.84, 5.71, "Table 4 (34-B)"), "resnet50": (20.74, 5.25, "Table 4"),
                     "resnet101": (19.87, 4.60, "Table 4"), "resnet152": (19.38, 4.49, "Table 4")}
LAYERS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}
PARAMS_M = {"resnet18": 11.7, "resnet34": 21.8, "resnet50": 25.6, "resnet101": 44.5, "resnet152": 60.2}


def _err(acc: float) -> float:
    return round(100.0 - acc, 3)


def _rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for (arch, weights), (a1, a5, resize) in TORCHVISION.items():
        rows.append({"arch": arch, "source": f"torchvision {weights[-2:]}", "weights": weights, "kind": ONE_CROP,
                     "resize": resize, "crop": 224, "interpolation": "bilinear", "top1_err": _err(a1),
                     "top5_err": _err(a5), "origin": f"torchvision.models.{_enum(arch)}.{weights}", "url": TV_URL})
    for arch, (e1, e5) in FB_RESNET_TORCH.items():
        rows.append({"arch": arch, "source": "fb.resnet.torch", "kind": ONE_CROP, "resize": 256, "crop": 224,
                     "interpolation": "bicubic", "top1_err": e1, "top5_err": e5,
                     "origin": "fb.resnet.torch README (single crop 224)", "url": FB_URL})
    for arch, (e1, e5, table) in PAPER_10CROP.items():
        rows.append({"arch": arch, "source": "paper", "kind": TEN_CROP, "resize": 256, "crop": 224,
                     "top1_err": e1, "top5_err": e5, "origin": f"He et al. 2015, {table}", "url": PAPER_URL})
    for arch, (e1, e5, table) in PAPER_MULTI_SCALE.items():
        rows.append({"arch": arch, "source": "paper", "kind": MULTI_SCALE, "resize": None, "crop": None,
                     "scales": [224, 256, 384, 480, 640], "top1_err": e1, "top5_err": e5,
                     "origin": f"He et al. 2015, {table}", "url": PAPER_URL})
    return rows


def _enum(arch: str) -> str:
    return f"ResNet{arch.removeprefix('resnet')}_Weights"


REFERENCES: list[dict[str, Any]] = _rows()

# The reference a row of ours is compared with, per protocol kind, in order of preference: torchvision V1 is
# the closest published 1-crop recipe to ours (resize 256, crop 224); the paper for 10-crop.
PRIMARY = {ONE_CROP: ("torchvision V1", "fb.resnet.torch"), TEN_CROP: ("paper",)}


def protocol_kind(protocol: str | None) -> str | None:
    """Our evaluation's protocol string ("10-crop resize 256 crop 224") -> its kind ("10-crop"); None when it
    names no known protocol (then nothing is compared with it)."""
    kind = protocol.split()[0] if protocol else ""
    return kind if kind in (ONE_CROP, TEN_CROP, MULTI_SCALE) else None


def references_for(arch: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Every reference row for `arch`, or only those of protocol `kind`."""
    return [r for r in REFERENCES if r["arch"] == arch and (kind is None or r["kind"] == kind)]


def matched_reference(arch: str, protocol: str) -> dict[str, Any] | None:
    """The reference of the same protocol kind as `protocol` to take a Δ against (None: there is none)."""
    kind = protocol_kind(protocol)
    refs = references_for(arch, kind)
    for source in PRIMARY.get(kind, ()):
        for r in refs:
            if r["source"] == source:
                return r
    return None


def delta(ours_err: float, ours_protocol: str, ref: dict[str, Any] | None, key: str = "top1_err") -> float | None:
    """Our error minus the reference's, or None unless both are of the same protocol kind."""
    if ref is None or ref.get(key) is None or ref["kind"] != protocol_kind(ours_protocol):  # also: unknown
        return None
    return round(ours_err - ref[key], 2)


def weights_transform(arch: str, weights_file: str | None) -> dict[str, Any] | None:
    """The published eval transform of a torchvision weights file (V1 '-0676ba61.pth' style names are matched
    through the URL's hash in pipeline.models.pretrained; here: V2 files resize 232, V1 256)."""
    if weights_file is None:
        return None
    version = "IMAGENET1K_V2" if weights_file in V2_FILES.values() else "IMAGENET1K_V1"
    if (arch, version) not in TORCHVISION:
        return None
    return {"resize": TORCHVISION[(arch, version)][2], "crop": 224, "interpolation": "bilinear",
            "antialias": True, "weights": version}


# The file names torchvision's V2 weights download as (the URL's last path component).
V2_FILES = {"resnet50": "resnet50-11ad3fa6.pth", "resnet101": "resnet101-cd907fc2.pth",
            "resnet152": "resnet152-f82ba261.pth"}
