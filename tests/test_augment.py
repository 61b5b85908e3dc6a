"""Augmentation: shapes, ranges, and mixup/cutmix targets against their definitions."""

from __future__ import annotations


import pytest
import torch

from mixer.augment import (RANDAUGMENT_OPS, AugmentConfig, _op, augment, hflip, mix, randaugment,
                           random_resized_crop, random_resized_crop_boxes)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(n=8, h=12, w=16):
    return torch.rand(n, 3, h, w, generator=gen(42))


def test_hflip_probability_one_and_zero():
    x = images()
    torch.testing.assert_close(hflip(x, 1.0, gen()), x.flip(-1))
    torch.testing.assert_close(hflip(x, 0.0, gen()), x)


def test_crop_boxes_respect_scale_ratio_and_bounds():
    boxes = random_resized_crop_boxes(2000, (0.3, 0.8), (0.75, 4 / 3), gen(), "cpu")
    cx, cy, w, h = boxes.unbind(1)
    assert ((w * h) <= 0.8 + 1e-6).all() and ((w * h) >= 0.3 * 0.75 - 1e-6).all()
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()


def test_full_crop_is_the_identity_and_a_crop_zooms():
    x = images()
    same = random_resized_crop(x, (1.0, 1.0), (1.0, 1.0), gen())
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    y = random_resized_crop(x, (0.2, 0.4), (0.9, 1.1), gen())
    assert y.shape == x.shape and not torch.allclose(y, x)


@pytest.mark.parametrize("name", RANDAUGMENT_OPS)
def test_each_randaugment_op_keeps_shape_and_range(name):
    x = images()
    y = _op(x, name, torch.full((x.shape[0],), 0.5))
    assert y.shape == x.shape and y.min() >= -1e-6 and y.max() <= 1 + 1e-6


@pytest.mark.parametrize("name", [n for n in RANDAUGMENT_OPS if n not in ("identity", "autocontrast")])
def test_each_randaugment_op_is_the_identity_at_magnitude_zero_and_changes_the_image_otherwise(name):
    x = torch.randint(50, 200, (8, 3, 12, 16), generator=gen(7)).float() / 255  # pixels as decoded, mid-range
    torch.testing.assert_close(_op(x, name, torch.zeros(8)), x, atol=1e-6, rtol=0)
    for level in (0.5, -0.5):  # both directions of the random sign act
        assert (_op(x, name, torch.full((8,), level)) - x).abs().amax(dim=(1, 2, 3)).min() > 0.005


def test_autocontrast_stretches_each_channel_to_the_full_range():
    x = torch.randint(50, 200, (8, 3, 12, 16), generator=gen(7)).float() / 255
    y = _op(x, "autocontrast", torch.zeros(8))
    torch.testing.assert_close(y.amin(dim=(2, 3)), torch.zeros(8, 3))
    torch.testing.assert_close(y.amax(dim=(2, 3)), torch.ones(8, 3))
    torch.testing.assert_close(_op(y, "autocontrast", torch.zeros(8)), y)  # a full-range image is kept


def test_randaugment_is_seeded():
    x = images()
    torch.testing.assert_close(randaugment(x, 2, 9, gen(1)), randaugment(x, 2, 9, gen(1)))
    assert not torch.equal(randaugment(x, 2, 9, gen(1)), x)


def test_mixup_mixes_pixels_and_targets_in_the_same_proportion():
    x, y = images(), torch.eye(4).repeat(2, 1)
    mixed, targets = mix(x, y, mixup=0.4, cutmix=0.0, g=gen(3))
    # sample 0 is class 0 mixed with the last sample (class 3): x0·lam + x7·(1 − lam)
    lam = (targets[0, 0]).item()
    assert targets[0, 3].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed[0], x[0] * lam + x[-1] * (1 - lam))
    torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_cutmix_target_equals_the_share_of_pasted_pixels():
    x = torch.zeros(2, 1, 20, 20)
    x[1] = 1.0
    y = torch.eye(2)
    mixed, targets = mix(x, y, mixup=0.0, cutmix=1.0, g=gen(7))
    pasted = mixed[0].mean().item()  # sample 0 is zeros; its ones came from sample 1
    assert targets[0, 1].item() == pytest.approx(pasted)
    assert targets[0, 0].item() == pytest.approx(1 - pasted)


def test_off_config_is_inactive_and_changes_nothing():
    config = AugmentConfig()
    assert not config.active
    x, y = images(), torch.eye(8)
    out, targets = augment(x, y, config, gen())
    assert torch.equal(out, x) and torch.equal(targets, y)
