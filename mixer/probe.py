"""A linear probe (`freeze: features`): only the head learns, so each image's features are computed
once, before the first epoch, and every epoch trains the head on them.

The features are what the head sees: the pooled output of the frozen layers, in eval mode (no
dropout or drop path), one vector of `dim` numbers per image. This holds only when the images do
not change from epoch to epoch, i.e. without augmentation; with it, the loop runs the frozen layers
on every batch instead (the same function of each image, recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from mixer.data import Split
from mixer.model import MlpMixer
from mixer.preprocess import Preprocessing


def freeze_features(model: MlpMixer) -> None:
    """Only the head keeps `requires_grad`; the rest keeps the checkpoint's weights."""
    for (name, parameter) in model.named_parameters():
        parameter.requires_grad_(name.startswith("head."))


def eval_frozen(model: nn.Module) -> None:
    """Put the frozen layers back in eval mode after `model.train()` (no dropout or drop path)."""
    for (name, module) in model.named_children():
        module.train(name == "head")


class Features:
    """A split's features in place of its images, computed on first use (a finished run never needs them)."""

    def __init__(self, model: MlpMixer, split: Split, preprocessing: Preprocessing, batch_size: int,
                 device: str | torch.device):
        self.labels, self.features = split.labels, None
        self._compute = lambda: features_of(model, split, preprocessing, batch_size, device)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray, pin: bool = False) -> tuple[Tensor, Tensor]:
        if self.features is None:
            self.features = self._compute()
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        features, labels = self.features[index], torch.from_numpy(self.labels[rows])
        return (features.pin_memory(), labels.pin_memory()) if pin else (features, labels)

    @staticmethod
    def on_device(features: Tensor) -> Tensor:
        return features

    def batch(self, rows: np.ndarray, device: str | torch.device) -> tuple[Tensor, Tensor]:
        features, labels = self.gather(rows)
        return features.to(device), labels.to(device)


@torch.no_grad()
def features_of(model: MlpMixer, split: Split, preprocessing: Preprocessing, batch_size: int,
                device: str | torch.device) -> Tensor:
    """Every image's pooled features, in eval mode (`no_grad`, not inference mode: the head's
    backward saves its input)."""
    was_training = model.training
    model.to(device).eval()
    rows = np.arange(len(split))
    chunks = [model.forward_head(model.forward_features(preprocessing.standardize(
        split.batch(rows[i:i + batch_size], device)[0])), pre_logits=True).float().cpu()
        for i in range(0, len(split), batch_size)]
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.dim)


class Probe(nn.Module):
    """The part of the model that learns: the head, under the same name (`head.weight`, `head.bias`)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


@dataclass(frozen=True)
class _AsIs(Preprocessing):
    """Features are already the model's input."""

    def standardize(self, x: Tensor) -> Tensor:
        return x


AS_IS = _AsIs()


def with_head(model: MlpMixer, probe: nn.Module) -> MlpMixer:
    """The whole model with `probe`'s head (an EMA's copy, or the trained head itself)."""
    model.head = probe.head
    return model


def learner(model: MlpMixer, train: Split, val: Split, preprocessing: Preprocessing, batch_size: int,
            device: str | torch.device, cache: bool) -> Learner:
    """What the loop trains for `freeze: features`: the head alone on each image's features, computed
    once (`cache`, only without augmentation: the images must not change between epochs), or the
    whole model with its other layers frozen and in eval mode."""
    freeze_features(model)
    if not cache:
        return Learner(model, train, val, preprocessing, train_mode=eval_frozen)
    return Learner(Probe(model.head), Features(model, train, preprocessing, batch_size, device),
                   Features(model, val, preprocessing, batch_size, device), AS_IS,
                   deliver=lambda trained: with_head(model, trained), fingerprint={"trains": "head"})


@dataclass
class Learner:
    """What the training loop trains and on what: by default the model itself, on images."""

    module: nn.Module
    train: Split | Features
    val: Split | Features
    preprocessing: Preprocessing
    deliver: Callable[[nn.Module], MlpMixer] = lambda trained: trained  # the trained module → the model to save
    train_mode: Callable[[nn.Module], None] = lambda module: module.train()
    fingerprint: dict = field(default_factory=dict)  # what the checkpoint holds, when it is not the whole model
