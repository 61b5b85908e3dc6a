"""Scoring a prepared split: logits in order, on one process or sharded over several."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixer.data import Split
from mixer.preprocess import Preprocessing


@torch.inference_mode()
def split_logits(model: nn.Module, split: Split, preprocessing: Preprocessing, batch_size: int,
                 accelerator=None, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Logits and labels of every image of `split`, in order.

    With several processes, rank r scores rows r, r + world, ... and the results are gathered back
    into order, each row once.
    """
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else device
    was_training = model.training
    model.eval()
    mine = np.arange(rank, len(split), world)
    outputs = [model(preprocessing.standardize(split.batch(mine[i:i + batch_size], device)[0])).float()
               for i in range(0, len(mine), batch_size)]
    local = torch.cat(outputs) if outputs else torch.zeros(0, model.head.out_features, device=device)
    model.train(was_training)
    labels = torch.from_numpy(split.labels)
    if world == 1:
        return local.cpu(), labels
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0)).view(world, -1, local.shape[1])
    ordered = torch.zeros(len(split), local.shape[1])
    for r in range(world):
        rows = np.arange(r, len(split), world)
        ordered[rows] = gathered[r, : len(rows)].cpu()
    return ordered, labels


def evaluate_split(model: nn.Module, split: Split, preprocessing: Preprocessing, batch_size: int,
                   accelerator=None) -> dict:
    """Loss and top-1 accuracy of `model` on a split."""
    logits, labels = split_logits(model, split, preprocessing, batch_size, accelerator)
    return {"loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean())}
