"""Scores from logits: top-k accuracy, loss, confusion matrix and per-class figures (scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score


@dataclass
class Scores:
    accuracy: float
    top5_accuracy: float | None
    loss: float
    confusion: np.ndarray          # (true, predicted) counts
    per_class: pd.DataFrame        # class, precision, recall, f1, support
    predicted: np.ndarray
    probabilities: np.ndarray


def score(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Scores:
    """Every figure evaluation reports, from one split's logits and true labels."""
    logits, labels = logits.float(), labels.long()
    probabilities = F.softmax(logits, dim=1).numpy()
    y = labels.numpy()
    predicted = probabilities.argmax(1)
    everything = np.arange(len(classes))
    top5 = None  # below 5 classes there is no top-5; with exactly 5 every image is in it (sklearn warns so)
    if len(classes) == 5:
        top5 = 1.0
    elif len(classes) > 5:
        top5 = float(top_k_accuracy_score(y, probabilities, k=5, labels=everything))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=everything, zero_division=0)
    per_class = pd.DataFrame({"class": classes, "precision": precision, "recall": recall,
                              "f1": f1, "support": support})
    return Scores(
        accuracy=float((predicted == y).mean()),
        top5_accuracy=top5,
        loss=float(F.cross_entropy(logits, labels)),
        confusion=confusion_matrix(y, predicted, labels=everything),
        per_class=per_class,
        predicted=predicted,
        probabilities=probabilities,
    )
