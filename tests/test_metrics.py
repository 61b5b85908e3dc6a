"""Evaluation figures against a case worked out by hand."""

from __future__ import annotations

import math
import warnings

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


def test_accuracy_top5_and_predictions_where_right_and_wrong_are_not_half_and_half():
    # the true class is 1st, 1st, 4th (in the top 5 but not the top 2) and 6th (outside the top 5)
    logits = torch.tensor([[9.0, 0, 0, 0, 0, 0], [0, 9.0, 0, 0, 0, 0],
                           [6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a class never predicted must not warn (zero_division)
        s = score(logits, torch.tensor([0, 1, 3, 5]), CLASSES)
    assert s.accuracy == 0.5 and s.top5_accuracy == 0.75
    s = score(logits[:3], torch.tensor([0, 1, 3]), CLASSES)
    assert s.accuracy == pytest.approx(2 / 3) and s.top5_accuracy == 1.0
    assert s.predicted.tolist() == [0, 1, 0]


def test_top5_from_five_classes_and_none_below():
    five = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 2, 3, 4, 5]])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns that top-5 of 5 classes is meaningless: not asked
        assert score(five, torch.tensor([4, 0]), CLASSES[:5]).top5_accuracy == 1.0
    s = score(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 2]), ["x", "y", "z"])
    assert s.top5_accuracy is None and s.accuracy == 0.5
