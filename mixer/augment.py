"""Batch augmentation on the training device, in plain torch ops (no torchvision).

Every function takes float images (batch, chans, H, W) in [0, 1] and a `torch.Generator` on the
images' device, so a run is reproducible. Nothing here runs at evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mixer.hparams import at_least, between, check, fraction, hp, ordered


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; the defaults are off."""

    hflip: float = hp(0.0, "probability of a horizontal flip", rule=fraction(high_closed=True))
    crop_scale: tuple[float, float] = hp((1.0, 1.0), "random resized crop area range ([1, 1]: off)",
                                         rule=ordered(lambda lo: lo > 0, lambda hi: hi <= 1, "a pair with 0 < low <= high <= 1"))
    crop_ratio: tuple[float, float] = hp((3 / 4, 4 / 3), "random resized crop aspect range",
                                         rule=ordered(lambda lo: lo > 0, lambda hi: True, "a pair with 0 < low <= high"))
    randaugment_n: int = hp(0, "RandAugment: operations per image (0: off; timm's policies use 2 or 3)",
                            rule=between(0, 16))  # each is a pass over the batch: a large n is a hang
    randaugment_m: int = hp(9, "RandAugment: magnitude", rule=between(0, 30))
    mixup: float = hp(0.0, "mixup alpha (0: off)", rule=at_least(0))
    cutmix: float = hp(0.0, "cutmix alpha (0: off)", rule=at_least(0))

    def __post_init__(self):
        check(self)

    @property
    def active(self) -> bool:
        return (self.hflip > 0 or self.crop_scale != (1.0, 1.0) or self.randaugment_n > 0
                or self.mixup > 0 or self.cutmix > 0)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _warp(x: Tensor, theta: Tensor, fill: float = 0.5) -> Tensor:
    """Sample each image through its own 2×3 affine map (normalised coordinates); outside → `fill`."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def hflip(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Flip each image left-right with probability `p`."""
    flip = torch.rand(x.shape[0], generator=g, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float],
                              g: torch.Generator, device) -> Tensor:
    """(n, 4) boxes (cx, cy, w, h) as fractions of the image: area in `scale`, w/h in `ratio`."""
    area = _uniform(n, scale[0], scale[1], g, device)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), g, device)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = w / 2 + torch.rand(n, generator=g, device=device) * (1 - w)
    cy = h / 2 + torch.rand(n, generator=g, device=device) * (1 - h)
    return torch.stack([cx, cy, w, h], dim=1)


def random_resized_crop(x: Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                        g: torch.Generator) -> Tensor:
    """Crop a random box from each image and resize it back to the full size (bilinear)."""
    cx, cy, w, h = random_resized_crop_boxes(x.shape[0], scale, ratio, g, x.device).unbind(1)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = w, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    return _warp(x, theta)


# ---- RandAugment (Cubuk et al. 2020): n ops per image, each at magnitude m of 30 ------------------

def _affine(x: Tensor, level: Tensor, kind: str) -> Tensor:
    n = x.shape[0]
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype).repeat(n, 1, 1)
    if kind == "rotate":
        angle = level * math.radians(30)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif kind == "shear_x":
        theta[:, 0, 1] = level * 0.3
    elif kind == "shear_y":
        theta[:, 1, 0] = level * 0.3
    elif kind == "translate_x":
        theta[:, 0, 2] = level * 0.45 * 2
    elif kind == "translate_y":
        theta[:, 1, 2] = level * 0.45 * 2
    return _warp(x, theta)


def _grey(x: Tensor) -> Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)[: x.shape[1]]
    return (x * weights[:, None, None]).sum(1, keepdim=True) / weights.sum()


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    return (b + (a - b) * factor[:, None, None, None]).clamp(0, 1)


def _op(x: Tensor, name: str, level: Tensor) -> Tensor:
    """Apply op `name`; `level` in [-1, 1] per image (sign picks the direction where there is one)."""
    if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        return _affine(x, level, name)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), 1 + 0.9 * level)
    if name == "contrast":
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
        return _blend(x, mean, 1 + 0.9 * level)
    if name == "color":
        return _blend(x, _grey(x).expand_as(x), 1 + 0.9 * level)
    if name == "solarize":
        threshold = (1 - level.abs())[:, None, None, None]
        return torch.where(x >= threshold, 1 - x, x)
    if name == "posterize":
        bits = (8 - (level.abs() * 4).round())[:, None, None, None]
        step = 2.0 ** (8 - bits)
        return torch.floor(x * 255 / step) * step / 255
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp(min=1e-6), x)
    return x  # identity


RANDAUGMENT_OPS = ("identity", "autocontrast", "brightness", "contrast", "color", "solarize",
                   "posterize", "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def randaugment(x: Tensor, n: int, m: int, g: torch.Generator) -> Tensor:
    """For each image, `n` rounds of one op drawn uniformly, at magnitude m/30 with a random sign."""
    level = m / 30.0
    for _ in range(n):
        choice = torch.randint(len(RANDAUGMENT_OPS), (x.shape[0],), generator=g, device=x.device)
        sign = torch.where(torch.rand(x.shape[0], generator=g, device=x.device) < 0.5, -1.0, 1.0)
        levels = (sign * level).to(x.dtype)
        out = x
        for (k, name) in enumerate(RANDAUGMENT_OPS[1:], start=1):
            # every op on the whole batch, each image keeping its own: gathering the images that drew an op
            # would need their number on the host, a wait for the device per op
            out = torch.where((choice == k)[:, None, None, None], _op(x, name, levels), out)
        x = out
    return x


# ---- mixup and cutmix: the batch mixed with itself reversed --------------------------------------

def mix(x: Tensor, targets: Tensor, mixup: float, cutmix: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019), half the batches each when both are on.

    `targets` are probabilities (batch, classes); returned mixed in the same proportion as the pixels.
    """
    # One decision and one box per batch: drawn on the host, by a generator that `g`'s seed decides,
    # since reading a number drawn on a GPU would wait for the GPU.
    host = np.random.default_rng([g.initial_seed(), 0x6D6978])
    use_cutmix = cutmix > 0 and (mixup == 0 or host.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0:
        return x, targets
    # lam ~ Beta(alpha, alpha), drawn by inverse CDF so that the seed alone decides it
    lam = _beta_quantile(alpha, host.random())
    flipped = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(host.integers(H)), int(host.integers(W))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the share of pixels actually kept
    else:
        x = x * lam + flipped * (1 - lam)
    return x, targets * lam + targets.flip(0) * (1 - lam)


def _beta_quantile(alpha: float, u: float) -> float:
    """The u-quantile of Beta(alpha, alpha)."""
    from scipy.special import betaincinv

    return float(betaincinv(alpha, alpha, u))


def augment(x: Tensor, targets: Tensor, config: AugmentConfig, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """The whole train-time pipeline: crop, flip, RandAugment, then mixup/cutmix."""
    if config.crop_scale != (1.0, 1.0):
        x = random_resized_crop(x, config.crop_scale, config.crop_ratio, g)
    if config.hflip > 0:
        x = hflip(x, config.hflip, g)
    if config.randaugment_n > 0:
        x = randaugment(x, config.randaugment_n, config.randaugment_m, g)
    return mix(x, targets, config.mixup, config.cutmix, g)
