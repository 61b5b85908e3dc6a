"""Optimizer and weight average: SGD or AdamW with decoupled decay on weights only, and an EMA."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mixer.errors import MixerError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and conv kernels; never norms or biases (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW with betas (momentum, 0.999), the paper's optimizer."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise MixerError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights, updated after every optimizer step (None: off)."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
