"""The schedule, against closed-form values; the original script's bugs cannot come back."""

from __future__ import annotations

import math

import pytest
import torch

from mixer.schedule import build_scheduler, lr_factor


def rates(steps_per_epoch, epochs, warmup, kind, floor=0.0, lr=0.1):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = build_scheduler(opt, steps_per_epoch, epochs, warmup, kind, floor)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_closed_form_values_cosine():
    r = rates(10, 30, 10, "cosine")  # 300 steps, warm-up 100
    assert r[0] == pytest.approx(0.1 * (1 / 10) / 10)          # e = 0.1 epoch
    assert r[49] == pytest.approx(0.1 * 5 / 10)                # e = 5: half-way through warm-up
    assert r[99] == pytest.approx(0.1)                         # e = 10: peak
    assert r[200] == pytest.approx(0.1 * 0.5)                  # 20 epochs done before it: cosine half-way
    t = (15 - 10) / 20
    assert r[150] == pytest.approx(0.1 * (1 + math.cos(math.pi * t)) / 2)
    # the last step (29.9 epochs done before it) still learns: the floor comes after it
    assert r[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * 19.9 / 20)) / 2) and r[-1] > 0


def test_closed_form_values_linear_with_floor():
    r = rates(4, 10, 2, "linear", floor=0.1)
    assert r[7] == pytest.approx(0.1)                           # e = 2: peak
    assert r[24] == pytest.approx(0.1 * (0.1 + 0.9 * (1 - 4 / 8)))  # 6 epochs before it: t = 1/2, where cosine agrees
    assert r[16] == pytest.approx(0.1 * (0.1 + 0.9 * (1 - 2 / 8)))  # 4 before it: t = 1/4, where it does not
    assert r[-1] == pytest.approx(0.1 * (0.1 + 0.9 * (1 - 7.75 / 8)))  # 9.75 before the last: above the floor


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize(("spe", "epochs", "warmup"), [(7, 30, 10), (3, 5, 5), (3, 5, 9), (5, 4, 0), (1, 1, 0),
                                                       (13, 1, 1), (2, 1, 0)])
def test_never_above_lr_nor_negative_and_monotone_phases(kind, spe, epochs, warmup):
    r = rates(spe, epochs, warmup, kind)
    assert all(0 <= x <= 0.1 + 1e-12 for x in r)
    peak = r.index(max(r))
    assert all(a <= b + 1e-12 for (a, b) in zip(r[:peak], r[1:peak + 1]))   # rising only in warm-up
    assert all(a >= b - 1e-12 for (a, b) in zip(r[peak:], r[peak + 1:]))    # then never rising


def test_warmup_of_zero_starts_at_the_peak():
    assert rates(5, 4, 0, "cosine")[0] == pytest.approx(0.1)  # no step done before the first: t = 0


def test_warmup_longer_than_training_only_warms_up():
    r = rates(4, 3, 6, "cosine")
    assert r[-1] == pytest.approx(0.1 * 3 / 6)     # reached half the peak at the end, never decays
    assert r == sorted(r)


def test_one_epoch_runs_do_not_flip():
    # the original cosine, stepped per batch with an epoch count, flipped between 0 and 1
    r = rates(50, 1, 0, "cosine")
    assert all(a >= b for (a, b) in zip(r, r[1:]))
    assert r[-1] == pytest.approx(0.1 * (1 + math.cos(math.pi * 49 / 50)) / 2) and r[-1] > 0


def test_one_warm_up_epoch_warms_up_and_the_rate_stays_at_the_floor_after_the_last_step():
    assert lr_factor(0, 10, 3, 1, "cosine", 0.0) == pytest.approx(0.1)  # e = 0.1 of 1 warm-up epoch
    # torch's scheduler computes the rate once more after the last optimizer step (e = T + 1/spe):
    # it must stay at the floor, not swing back up the cosine
    assert lr_factor(30, 10, 3, 1, "cosine", 0.2) == pytest.approx(0.2)
    assert lr_factor(30, 10, 3, 1, "linear", 0.2) == pytest.approx(0.2)


def test_an_unknown_kind_is_named():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="unknown scheduler 'step'"):
        build_scheduler(opt, 10, 3, 1, "step", 0.0)


def test_lr_factor_is_pure():
    assert lr_factor(9, 10, 3, 1, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(20, 10, 3, 1, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(19, 10, 3, 1, "linear", 0.0) == pytest.approx(0.55)  # 1.9 epochs done before step 19
    with pytest.raises(ValueError):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1, 1, 0, "step", 0.0)
