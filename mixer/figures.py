"""PNG figures that open without a network: confusion matrix, learning curves, worst mistakes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def plain(text: str) -> str:
    """Text that matplotlib shows as written: a `$` would otherwise start mathtext (and can fail)."""
    return str(text).replace("$", r"\$")


def confusion_figure(confusion: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (recall on the diagonal) with class names."""
    n = len(classes)
    classes = [plain(c) for c in classes]
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    size = min(max(4.0, 0.45 * n + 2), 24.0)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= 40:
        ax.set_xticks(range(n), labels=classes, rotation=90 if n > 10 else 0, fontsize=8 if n > 20 else 10)
        ax.set_yticks(range(n), labels=classes, fontsize=8 if n > 20 else 10)
    if n <= 20:
        for (i, j) in np.ndindex(n, n):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix (test, {int(confusion.sum())} images)")
    _save(fig, path)


def learning_curves_figure(history: pd.DataFrame, path: Path) -> None:
    """Loss, accuracy (train and val) and learning rate against epoch, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    epoch = history["step"] + 1
    for (ax, name) in zip(axes[:2], ("loss", "accuracy")):
        for split in ("train", "val"):
            column = f"{split}/{name}"
            if column in history:
                ax.plot(epoch, history[column], marker=".", label=split)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    if "lr" in history:
        axes[2].plot(epoch, history["lr"], color="tab:green")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def mistakes_figure(images: np.ndarray, true: list[str], predicted: list[str], confidence: np.ndarray,
                    path: Path, columns: int = 4) -> None:
    """A grid of misclassified images (uint8 N×H×W×3), each titled true → predicted (probability)."""
    n = max(len(images), 1)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), dpi=100, squeeze=False)
    for (k, ax) in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title(f"true {plain(true[k])}\npred {plain(predicted[k])} ({confidence[k]:.2f})", fontsize=9)
    if not len(images):
        axes.flat[0].text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
    fig.suptitle("Worst test mistakes (lowest probability of the true class)")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
