"""How an image file becomes the model's input, beyond its size: one record, saved with the model.

`prepare` fixes the resize policy of the cache (and its size, which the architecture also fixes);
the weights fix the normalisation (0.5/0.5 for the paper's and timm's Mixer weights). Training saves
the record in the model directory's `config.json`; evaluation, predict and export read it from
there, so every path into the model prepares an image the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mixer.errors import MixerError

RESIZE_POLICIES = ("stretch", "center_crop")
PAPER_MEAN = PAPER_STD = (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1], as the paper's weights expect


@dataclass(frozen=True)
class Preprocessing:
    resize: str = "stretch"
    mean: tuple[float, float, float] = PAPER_MEAN
    std: tuple[float, float, float] = PAPER_STD

    def __post_init__(self):
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.resize not in RESIZE_POLICIES:
            raise MixerError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {self.resize!r}")
        for (name, values) in (("mean", self.mean), ("std", self.std)):
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in values):
                raise MixerError(f"normalization {name} must be three finite numbers, got {list(values)}")
        if min(self.std) <= 0:
            raise MixerError(f"normalization std must be positive, got {list(self.std)}")

    def to_dict(self) -> dict:
        return {"resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        if not isinstance(d, dict) or set(d) != {"resize", "mean", "std"}:
            raise MixerError(f"preprocessing must have exactly resize, mean and std, got {d!r}")
        if not all(isinstance(d[k], list) for k in ("mean", "std")):
            raise MixerError(f"preprocessing mean and std must be lists, got {d['mean']!r} and {d['std']!r}")
        return cls(**d)

    def standardize(self, x: Tensor) -> Tensor:
        """Float images in [0, 1], (batch, 3, H, W) → the model's input."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def to_float(images: Tensor) -> Tensor:
    """uint8 (batch, H, W, 3) → float (batch, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)
