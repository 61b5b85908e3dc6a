"""Optimizer and weight average: SGD or AdamW with decoupled decay on weights only, and an EMA."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mixer.errors import MixerError


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Decay weight matrices and conv kernels; never norms or biases (1-D tensors). Each group's
    `lr_scale` multiplies the rate (`build_optimizer`).

    `layer_decay` < 1: layer-wise rate decay, as BEiT and timm's fine-tuning recipes: with the stem as
    layer 0, block i (0-based) as layer i + 1 and the final norm and head as layer depth + 1, a layer's
    scale is layer_decay^(depth + 1 − layer), so block i trains at lr · layer_decay^(depth − i) and the
    head at lr. At 1 there are two groups, decayed and not; a module without `blocks` (the probe's
    head) is one layer."""
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], dict] = {}
    for (name, p) in model.named_parameters():
        if p.requires_grad:
            layer = depth + 1 if layer_decay == 1.0 else _layer(name, depth)
            group = groups.setdefault((layer, p.ndim <= 1), {"params": [], "lr_scale": layer_decay ** (depth + 1 - layer),
                                                              "weight_decay": 0.0 if p.ndim <= 1 else weight_decay})
            group["params"].append(p)
    return [groups[key] for key in sorted(groups)]  # by layer, the decayed group first


def _layer(name: str, depth: int) -> int:
    if name.startswith("stem."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # the final norm and the head


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float,
                    weight_decay: float, fused: bool = False, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW with betas (momentum, 0.999), the paper's optimizer; `layer_decay`:
    see `param_groups`.

    `fused`: one kernel for the whole update (torch's `fused=True`, for both SGD and AdamW), which the
    engine asks for when it trains on a CUDA device; else torch's default for the device (on a CPU the
    single-tensor loop).
    The same update to float rounding.
    """
    groups = [{**group, "lr": lr * group["lr_scale"]} for group in param_groups(model, weight_decay, layer_decay)]
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
