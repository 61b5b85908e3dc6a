"""Which split each image goes to, and which images repeat across splits or classes.

The split depends only on (file key, label, seed): the same file lands in the same split on every
run and machine, whatever order the files were listed in.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")


def split_by_class(keys: list[str], labels: np.ndarray, val_fraction: float, test_fraction: float,
                   seed: int) -> np.ndarray:
    """A split name per item: per class, sorted by key, shuffled with `seed`, cut by the fractions.

    Depends only on the keys, labels and seed, never on listing order; every class keeps at least
    one training image, and classes of 3+ images get at least one test image.
    """
    out = np.empty(len(keys), dtype=object)
    for label in np.unique(labels):
        members = sorted(np.flatnonzero(labels == label), key=lambda i: keys[i])
        rng = np.random.default_rng([seed, int(label)])
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1 if n >= 3 else 0), n - 1)
        n_val = min(round(n * val_fraction), n - 1 - n_test)
        for (rank, i) in enumerate(members):
            out[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


_SPLIT_ORDER = {name: i for (i, name) in enumerate(SPLITS)}


def find_cross_split_duplicates(table: pd.DataFrame) -> list[dict]:
    """Images whose decoded content also appears in an earlier split (train < val < test).

    Each entry names the later copy (`path`, `split`) and the copy it duplicates (`same_as`).
    """
    out = []
    for (_, group) in table.groupby("hash"):
        if group["split"].nunique() < 2:
            continue
        group = group.assign(order=group["split"].map(_SPLIT_ORDER)).sort_values(["order", "path"])
        first = group.iloc[0]
        for (_, row) in group.iterrows():
            if row["split"] != first["split"]:
                out.append({"path": row["path"], "split": row["split"],
                            "same_as": first["path"], "same_as_split": first["split"]})
    return sorted(out, key=lambda d: d["path"])


def find_label_conflicts(table: pd.DataFrame) -> list[dict]:
    """Images whose decoded content appears under two or more classes (a copy filed in a wrong folder):
    both labels would be learned. Each entry names the first copy (`path`), the labels, and every copy
    with its label (`copies`, `copy_labels`), in path order."""
    labels_per_hash = table.groupby("hash")["label_name"].transform("nunique")
    out = []
    for (_, group) in table[labels_per_hash > 1].sort_values("path").groupby("hash"):
        out.append({"path": group["path"].iloc[0], "labels": list(dict.fromkeys(group["label_name"])),
                    "copies": list(group["path"]), "copy_labels": list(group["label_name"])})
    return sorted(out, key=lambda d: d["path"])
