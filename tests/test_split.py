"""The split (stratified, seeded, order-free, never an empty training share) and cross-split duplicates."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from mixer.split import find_cross_split_duplicates, split_by_class


def counts(split: np.ndarray) -> tuple[int, int, int]:
    return (int((split == "train").sum()), int((split == "val").sum()), int((split == "test").sum()))


def test_split_is_stratified_seeded_and_independent_of_listing_order():
    keys = [f"c{i % 3}/{i:03d}.png" for i in range(90)]
    labels = np.array([i % 3 for i in range(90)])
    split = split_by_class(keys, labels, 0.1, 0.2, seed=4)
    for c in range(3):
        assert counts(split[labels == c]) == (21, 3, 6)
    order = list(range(90))
    random.Random(1).shuffle(order)
    shuffled = split_by_class([keys[i] for i in order], labels[order], 0.1, 0.2, seed=4)
    assert {keys[i]: s for (i, s) in zip(order, shuffled)} == dict(zip(keys, split))
    assert list(split_by_class(keys, labels, 0.1, 0.2, seed=5)) != list(split)


def test_each_class_is_shuffled_by_its_own_stream():
    """Two classes whose files sort alike must not get the same pattern of splits."""
    keys = [f"{c}/{i:02d}.png" for c in "ab" for i in range(30)]
    labels = np.repeat([0, 1], 30)
    split = split_by_class(keys, labels, 0.2, 0.2, seed=0)
    assert list(split[:30]) != list(split[30:])


# (class size, val_fraction, test_fraction) -> (train, val, test), worked out by hand from the rule:
# test = round(n·t), at least 1 from 3 images up, at most n-1; val = round(n·v) of what is left but one.
SIZES = [
    ((1, 0.1, 0.2), (1, 0, 0)),
    ((2, 0.1, 0.2), (2, 0, 0)),
    ((2, 0.5, 0.2), (1, 1, 0)),
    ((3, 0.1, 0.2), (2, 0, 1)),     # round(0.6) = 1 anyway
    ((3, 0.1, 0.1), (2, 0, 1)),     # round(0.3) = 0, raised to 1
    ((3, 0.4, 0.4), (1, 1, 1)),
    ((10, 0.45, 0.45), (2, 4, 4)),  # round(4.5) = 4
    ((10, 0.05, 0.9), (1, 0, 9)),
    ((2, 0.05, 0.9), (1, 0, 1)),    # round(1.8) = 2, cut to leave one training image
    ((20, 0.2, 0.79), (1, 3, 16)),  # val cut to leave one training image
]


@pytest.mark.parametrize(("case", "expected"), SIZES, ids=[str(c) for (c, _) in SIZES])
def test_split_sizes_at_the_edges(case, expected):
    (n, val, test) = case
    assert counts(split_by_class([f"{i}" for i in range(n)], np.zeros(n, int), val, test, seed=0)) == expected


def table(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["hash", "split", "path"])


def test_duplicates_name_each_later_copy_and_the_first_one():
    rows = [
        ("h1", "train", "a/1"), ("h1", "val", "a/2"), ("h1", "test", "b/3"),
        ("h2", "val", "v/1"), ("h2", "val", "v/2"),                           # one split only: not a leak
        ("h3", "test", "c/9"), ("h3", "val", "z/1"), ("h3", "test", "c/8"),
        ("h4", "train", "t/1"),
        ("h5", "test", "aa"), ("h5", "train", "zz"),                          # the split order beats the name
        ("h6", "train", "m/2"), ("h6", "val", "m/0"), ("h6", "train", "m/1"),  # within a split, by name
    ]
    found = find_cross_split_duplicates(table(rows))
    assert found == [
        {"path": "a/2", "split": "val", "same_as": "a/1", "same_as_split": "train"},
        {"path": "aa", "split": "test", "same_as": "zz", "same_as_split": "train"},
        {"path": "b/3", "split": "test", "same_as": "a/1", "same_as_split": "train"},
        {"path": "c/8", "split": "test", "same_as": "z/1", "same_as_split": "val"},
        {"path": "c/9", "split": "test", "same_as": "z/1", "same_as_split": "val"},
        {"path": "m/0", "split": "val", "same_as": "m/1", "same_as_split": "train"},
    ]
    assert find_cross_split_duplicates(table(rows).sample(frac=1, random_state=3)) == found


def test_no_duplicates_in_distinct_content():
    assert find_cross_split_duplicates(table([("h1", "train", "a"), ("h2", "val", "b"), ("h3", "test", "c")])) == []
