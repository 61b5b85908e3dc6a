"""Optimizer and weight average: SGD or AdamW with decoupled decay on weights only, and an EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mixer.errors import MixerError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and conv kernels; never norms or biases (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float, fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW with betas (momentum, 0.999), the paper's optimizer.

    `fused`: one kernel for the whole update (torch's `fused=True`, for both SGD and AdamW), which the
    engine asks for when it trains on a CUDA device; else torch's default for the device (on a CPU the
    single-tensor loop).
    The same update to float rounding.
    """
    groups = param_groups(model, weight_decay)
    kernel = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kernel)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **kernel)
    raise MixerError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def use_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Keep the kernel this machine chose after a checkpoint's state is loaded: `load_state_dict` takes
    the saved groups' `fused`/`foreach`, i.e. those of the machine that wrote the checkpoint."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, None)


def wants_fused(device: torch.device | str) -> bool:
    """Whether a run on `device` takes the fused optimizer kernels: on CUDA, where they are faster."""
    return torch.device(device).type == "cuda"


class EMA:
    """An exponential moving average of a model's weights: after each optimizer step
    ema ← decay·ema + (1 − decay)·weights, the first update copying them (as torch's AveragedModel does).

    Not AveragedModel: its update compares a step counter that lives on the device with 0, a wait for
    the device every step. Here the counter is a host integer and the update one fused lerp.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if self.updates == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        self.updates += 1

    def to(self, device) -> "EMA":
        self.module.to(device)
        return self

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def make_ema(model: nn.Module, decay: float) -> EMA | None:
    """The weights' EMA, updated after every optimizer step (None: off)."""
    return EMA(model, decay) if decay > 0 else None
