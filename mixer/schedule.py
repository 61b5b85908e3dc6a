"""Learning-rate schedule: linear warm-up, then cosine or linear decay to a floor, per optimizer step.

The rate of optimizer step k (0-based) is a function of the fractional epoch, so it is stepped once
per optimizer step whatever the epoch length:

    (k + 1) / s <  W:  lr · ((k + 1) / s) / W                  (warm-up; W = warmup epochs, s = steps per epoch)
    otherwise:         floor + (lr - floor) · d((k / s - W) / (T - W))   (T = total epochs)

with d(t) = (1 + cos(π t)) / 2 for cosine and 1 - t for linear, t clamped to [0, 1]. The warm-up
counts the steps done after this one, so the first step does not run at 0; the decay counts those
done before it, so the last step does not run at the floor (it would change nothing with a floor of
0). If W >= T the whole run warms up and never decays. The rate never exceeds lr nor falls below
the floor.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, kind: str,
              floor: float) -> float:
    """The multiplier of the peak rate at optimizer step `step` (0-based); `floor` is a fraction."""
    e = (step + 1) / steps_per_epoch
    if warmup_epochs > 0 and e < warmup_epochs:
        return min(e / warmup_epochs, 1.0)
    if warmup_epochs >= epochs:
        return 1.0
    t = min(max((step / steps_per_epoch - warmup_epochs) / (epochs - warmup_epochs), 0.0), 1.0)
    decay = (1 + math.cos(math.pi * t)) / 2 if kind == "cosine" else 1 - t
    return floor + (1 - floor) * decay


def build_scheduler(optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: int,
                    kind: str, floor: float) -> LambdaLR:
    """A torch LambdaLR over optimizer steps; call `.step()` after every optimizer step."""
    if kind not in ("cosine", "linear"):
        raise ValueError(f"unknown scheduler {kind!r}")
    return LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs, warmup_epochs, kind, floor))
