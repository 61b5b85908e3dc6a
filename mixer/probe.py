"""A linear probe (`freeze: features`): only the head learns, so each image's features are computed
once, before the first epoch, and every epoch trains the head on them.

The features are what the head sees: the pooled output of the frozen layers, in eval mode (no
dropout or drop path), one vector of `dim` numbers per image. This holds only when the images do
not change from epoch to epoch, i.e. without augmentation; with it, the loop runs the frozen layers
on every batch instead (the same function of each image, recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """A split's features in place of its images: what `Split.batch` gives, a row per image."""

    def __init__(self, features: Tensor, split: Split):
        self.features, self.labels = features, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray, device: str | torch.device) -> tuple[Tensor, Tensor]:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        return self.features[index].to(device), torch.from_numpy(self.labels[rows]).to(device)


@torch.no_grad()
def features_of(model: MlpMixer, split: Split, preprocessing: Preprocessing, batch_size: int,
                device: str | torch.device) -> Features:
    """Every image's pooled features, in eval mode (`no_grad`, not inference mode: the head's
    backward saves its input)."""
    was_training = model.training
    model.eval()
    rows = np.arange(len(split))
    chunks = [model.forward_head(model.forward_features(preprocessing.standardize(
        split.batch(rows[i:i + batch_size], device)[0])), pre_logits=True).float().cpu()
        for i in range(0, len(split), batch_size)]
    model.train(was_training)
    dim = model.config.dim
    return Features(torch.cat(chunks) if chunks else torch.zeros(0, dim), split)


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
