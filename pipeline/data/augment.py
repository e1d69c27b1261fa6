"""The recipe's augmentations after the crop: automatic augmentation policies, PCA colour noise, random erasing,
repeated augmentation's copy seeds and progressive resizing's per-epoch crop sizes.

Every image function takes and returns a uint8 torch tensor (C, H, W) on any device (the decode tasks call them on
CPU, a GPU-side pipeline could call them on the GPU) and draws its randomness from the numpy Generator it is
given, never from OS entropy or torch's global generator. So a seeded Generator (train.deterministic) reproduces
an image's augmentation exactly, whatever process or order it is decoded in.

torchvision's classification recipe applies, in this order: RandomResizedCrop + flip (pipeline.data.transforms
`train_image`), then the auto-augment policy on uint8 pixels, then (after normalisation) RandomErasing with
value 0. Erasing here runs on uint8 pixels before normalisation, so it fills with the ImageNet mean pixel, which
normalisation maps to 0: the same images as torchvision's order.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data.transforms import MEAN

if TYPE_CHECKING:
    import torch

POLICIES = ("ta_wide", "ra")
# torchvision RandomErasing's defaults (Zhong et al. 2017): erased area 2-33% of the image, aspect 0.3-3.3.
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
# The fill: ImageNet's mean pixel, 0 after normalisation (torchvision erases normalised tensors with value 0).
ERASE_FILL = tuple(int(round(m * 255)) for m in MEAN)
# The principal components of ImageNet's RGB pixels (on a 0-1 scale) that AlexNet's colour augmentation uses
# (Krizhevsky et al. 2012, sec. 4.1; the paper's sec. 3.4 "standard color augmentation in [21]"): the values
# fb.resnet.torch's `Lighting` transform ships (datasets/imagenet.lua). Columns of PCA_EIGVEC are the components.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))


@dataclass(frozen=True)
class Augment:
    """The post-crop augmentations of one recipe (train.auto_augment, ra_magnitude, random_erase)."""

    policy: str | None = None  # None | "ta_wide" | "ra"
    ra_magnitude: int = 9
    random_erase: float = 0.0
    pca_lighting: float = 0.0  # std of AlexNet's PCA colour noise; 0 = off

    def __post_init__(self) -> None:
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"train.auto_augment: unknown policy {self.policy!r}; choose from {list(POLICIES)}")
        if not 0.0 <= self.random_erase <= 1.0:
            raise ValueError(f"train.random_erase must be in [0, 1], got {self.random_erase}")
        if self.pca_lighting < 0:
            raise ValueError(f"train.pca_lighting must be >= 0, got {self.pca_lighting}")

    @property
    def active(self) -> bool:
        return self.policy is not None or self.random_erase > 0 or self.pca_lighting > 0

    @classmethod
    def from_train(cls, tp: Any) -> Augment:
        """From the train section of params (pipeline.config.TrainParams)."""
        return cls(policy=tp.auto_augment, ra_magnitude=tp.ra_magnitude, random_erase=tp.random_erase,
                   pca_lighting=tp.pca_lighting)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (C, H, W) -> uint8 (C, H, W): the policy, the PCA colour noise, then erasing."""
        if self.policy is not None:
            image = auto_augment(image, self.policy, rng, self.ra_magnitude)
        if self.pca_lighting > 0:
            image = pca_lighting(image, rng, self.pca_lighting)
        if self.random_erase > 0:
            image = random_erase(image, rng, self.random_erase)
        return image


_POLICY_CACHE: dict[tuple[str, int], Any] = {}
_IMPORT_LOCK = threading.Lock()


def _import_v2() -> Any:
    """torchvision.transforms.v2, imported on the first augmented image of a decode worker (the val-only and
    plain-crop paths never pay torch's import). Seen once in a Ray decode worker (tests/test_presets.py, torch 2.14):
    the import failed with "partially initialized module 'torch._dynamo' has no attribute 'decorators'", an import
    cycle torchvision -> torch.compiler.disable -> torch._dynamo racing another import in the process. So
    torch._dynamo is imported first, on its own, and a failed attempt (Python drops a module whose import raised)
    is retried after a pause, under one lock for this module's callers."""
    with _IMPORT_LOCK:
        for attempt in range(3):
            try:
                import torch._dynamo  # noqa: F401 (complete before torchvision's tv_tensors needs it)
                from torchvision.transforms import v2

                return v2
            except (ImportError, AttributeError):
                if attempt == 2:
                    raise
                time.sleep(0.5)
    raise AssertionError("unreachable")


def _policy(name: str, magnitude: int) -> Any:
    key = (name, magnitude)
    if key not in _POLICY_CACHE:
        v2 = _import_v2()
        # torchvision's recipe: TrivialAugmentWide / RandAugment(magnitude) with bilinear interpolation.
        from torchvision.transforms import InterpolationMode

        bilinear = InterpolationMode.BILINEAR
        _POLICY_CACHE[key] = (v2.TrivialAugmentWide(interpolation=bilinear) if name == "ta_wide"
                              else v2.RandAugment(magnitude=magnitude, interpolation=bilinear))
    return _POLICY_CACHE[key]


def auto_augment(image: torch.Tensor, policy: str, rng: np.random.Generator, magnitude: int = 9) -> torch.Tensor:
    """TrivialAugmentWide ('ta_wide', Mueller & Hutter 2021) or RandAugment ('ra', Cubuk et al. 2020, 2 ops at
    `magnitude`) from torchvision.transforms.v2 on one uint8 (C, H, W) image.

    torchvision's policies draw from torch's global generator; it is reseeded from `rng` for this one image
    inside `fork_rng`, so the caller's torch random stream is left as it was (the training loop's dropout and
    mixup streams must not depend on how many images a process augmented)."""
    import torch

    if policy not in POLICIES:
        raise ValueError(f"train.auto_augment: unknown policy {policy!r}; choose from {list(POLICIES)}")
    # v2's policies draw their parameters on the CPU generator, whatever the image's device.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(0, 2**63 - 1)))
        return _policy(policy, magnitude)(image)


def erase_box(height: int, width: int, rng: np.random.Generator,
              scale: tuple[float, float] = ERASE_SCALE, ratio: tuple[float, float] = ERASE_RATIO
              ) -> tuple[int, int, int, int] | None:
    """torchvision RandomErasing.get_params: up to 10 tries at a random area and log-uniform aspect; returns
    (top, left, h, w), or None when no try fits (the image is then left as it is, like torchvision)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return None


def random_erase(image: torch.Tensor, rng: np.random.Generator, p: float) -> torch.Tensor:
    """With probability `p`, one rectangle of the uint8 (C, H, W) image set to the mean pixel (a new tensor;
    the input is not modified)."""
    import torch

    if p <= 0 or rng.random() >= p:
        return image
    box = erase_box(int(image.shape[-2]), int(image.shape[-1]), rng)
    if box is None:
        return image
    top, left, h, w = box
    out = image.clone()
    fill = torch.tensor(ERASE_FILL[: image.shape[0]], dtype=image.dtype, device=image.device).view(-1, 1, 1)
    out[:, top : top + h, left : left + w] = fill
    return out


def lighting_shift(rng: np.random.Generator, std: float) -> np.ndarray:
    """AlexNet's colour augmentation for one image: the RGB offset (0-255 scale) added to every pixel,
    sum_i PCA_EIGVEC[:, i] * alpha_i * PCA_EIGVAL[i] with alpha_i ~ N(0, std) (AlexNet: std 0.1)."""
    alpha = rng.normal(0.0, std, size=3)
    return np.asarray(PCA_EIGVEC) @ (alpha * np.asarray(PCA_EIGVAL)) * 255.0


def pca_lighting(image: torch.Tensor, rng: np.random.Generator, std: float) -> torch.Tensor:
    """One uint8 RGB (3, H, W) image shifted along ImageNet's colour principal components (a new tensor), rounded
    and clipped to [0, 255]. Added before normalisation, as fb.resnet.torch adds it to 0-1 pixels."""
    import torch

    if std <= 0:
        return image
    shift = torch.tensor(lighting_shift(rng, std), dtype=torch.float32, device=image.device).view(3, 1, 1)
    return (image.to(torch.float32) + shift).round_().clamp_(0, 255).to(torch.uint8)


def row_seed(seed: int, epoch: int, key: str, copy: int = 0) -> list[int]:
    """The entropy of one row's augmentation in one epoch (train.deterministic): from the run's seed, the epoch,
    the row's key and, with repeated augmentation, the copy. A key names one image, so the draws do not depend
    on which task, block or rank decodes it."""
    return [int(seed), int(epoch), zlib.crc32(str(key).encode()), int(copy)]


def progressive_sizes(epochs: int, end_size: int, start_size: int | None, ramp_start: float = 0.0,
                      ramp_end: float = 0.85, step: int = 32) -> list[int]:
    """The train crop of each epoch (FFCV's progressive resizing): `start_size` until the ramp starts, then
    linearly up to `end_size` where it ends, rounded to a multiple of `step` (sizes that are multiples of the
    network's stride 32 keep every stage's feature map whole) and never outside [start, end]; `end_size` after.
    The ramp's ends are fractions of the run (so a per-arch epoch count keeps its shape). No `start_size`:
    `end_size` every epoch."""
    if start_size is None or epochs <= 1:
        return [end_size] * epochs
    if start_size > end_size:
        raise ValueError(f"train.prog_resize_min_size {start_size} is above train.train_crop_size {end_size}")
    first, last = ramp_start * (epochs - 1), ramp_end * (epochs - 1)
    sizes = []
    for epoch in range(epochs):
        if epoch <= first:
            frac = 0.0
        elif epoch >= last:
            frac = 1.0
        else:
            frac = (epoch - first) / (last - first)
        size = start_size + frac * (end_size - start_size)
        size = int(round(size / step)) * step if frac < 1.0 else end_size
        sizes.append(min(max(size, start_size), end_size))
    return sizes


def size_for_epoch(sizes: Sequence[int], epoch: int) -> int:
    """`sizes[epoch]`, the last size past the end (a pass index beyond the run, e.g. a benchmark's extra pass)."""
    return int(sizes[min(max(epoch, 0), len(sizes) - 1)])


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bilinear with antialias, uint8 kept uint8. The training loop's
    guard: a batch decoded at another epoch's progressive size (a resumed run restarts Ray Data's pass count)
    is brought to this epoch's size on the device instead of training at the wrong resolution."""
    import torch
    from torch.nn import functional as F  # noqa: N812 (torch's convention)

    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if images.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out
