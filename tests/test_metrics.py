"""Evaluation figures against a case worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mixer.metrics import score

CLASSES = ["a", "b", "c", "d", "e", "f"]


def test_scores_on_a_hand_computed_case():
    # 4 images; rows are logits over 6 classes
    logits = torch.tensor([
        [5.0, 4, 3, 2, 1, 0],   # true a, predicted a
        [5.0, 4, 3, 2, 1, 0],   # true b, predicted a; b is 2nd: in the top 5
        [0.0, 1, 2, 3, 4, 5],   # true a, predicted f; a is last: not in the top 5
        [0.0, 0, 9, 0, 0, 0],   # true c, predicted c
    ])
    labels = torch.tensor([0, 1, 0, 2])
    s = score(logits, labels, CLASSES)
    assert s.accuracy == 0.5
    assert s.top5_accuracy == 0.75
    # cross-entropy by hand: -log softmax at the true class, averaged
    lse = math.log(sum(math.exp(v) for v in range(6)))
    expected = (lse - 5 + lse - 4 + lse - 0 + math.log(5 + math.exp(9)) - 9) / 4
    assert s.loss == pytest.approx(expected, rel=1e-6)
    assert s.confusion.tolist() == [
        [1, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0],
    ]
    a = s.per_class.set_index("class").loc["a"]
    assert (a.precision, a.recall, a.support) == (0.5, 0.5, 2)   # predicted a twice, once right
    assert a.f1 == pytest.approx(0.5)
    c = s.per_class.set_index("class").loc["c"]
    assert (c.precision, c.recall, c.f1, c.support) == (1.0, 1.0, 1.0, 1)
    f = s.per_class.set_index("class").loc["f"]
    assert (f.precision, f.recall, f.support) == (0.0, 0.0, 0)
    np.testing.assert_allclose(s.probabilities.sum(1), 1, rtol=1e-6)


def test_no_top5_below_five_classes():
    s = score(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 2]), ["x", "y", "z"])
    assert s.top5_accuracy is None and s.accuracy == 0.5
