"""Fast, direct tests of the loop's small modules (preprocess, evaluation, probe, optim, augment): each
asserts a behaviour the engine relies on, in well under a second, so that mutation testing of these
modules (docs/testing.md, "Mutation score") finds a failing test quickly. Random draws are checked
against the same generator replayed, geometric and colour ops against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import betaincinv

from mixer.augment import (RANDAUGMENT_OPS, AugmentConfig, _grey, _op, _uniform, augment, hflip, mix, randaugment,
                           random_resized_crop, random_resized_crop_boxes)
from mixer.data import Split
from mixer.errors import MixerError
from mixer.evaluation import evaluate_split, split_logits
from mixer.model import create_model
from mixer.optim import EMA, build_optimizer, make_ema, param_groups, use_fused, wants_fused
from mixer.preprocess import PAPER_MEAN, Preprocessing, to_float
from mixer.probe import (AS_IS, Features, Learner, Probe, eval_frozen, features_of, freeze_features, learner,
                         with_head)

CHANNELS = Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))


def tiny(classes=3, seed=123):
    torch.manual_seed(seed)
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=classes)
    with torch.no_grad():  # the paper's zero head would make every logit 0
        model.head.weight.normal_()
        model.head.bias.normal_()
    return model


def split(n=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.int64)
    return Split(images, labels, [f"{i}.png" for i in range(n)], [str(c) for c in range(classes)])


def model_input(s, pre=CHANNELS):
    return pre.standardize(to_float(torch.from_numpy(s.images)))


# ---- preprocess --------------------------------------------------------------------------------

def test_preprocessing_defaults_are_the_papers():
    p = Preprocessing()
    assert (p.resize, p.mean, p.std) == ("stretch", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) and PAPER_MEAN == (0.5,) * 3
    assert Preprocessing(resize="center_crop", mean=[0, 0, 1], std=[1, 2, 3]).mean == (0, 0, 1)
    assert isinstance(Preprocessing(std=[1, 2, 3]).std, tuple)


@pytest.mark.parametrize(("kw", "words"), [
    ({"resize": "squash"}, ["resize must be one of stretch, center_crop", "'squash'"]),
    ({"mean": (0.5, 0.5)}, ["normalization mean must be three finite numbers", "[0.5, 0.5]"]),
    ({"std": (1, 1, 1, 1)}, ["normalization std must be three finite numbers"]),
    ({"mean": (0.5, "0.5", 0.5)}, ["normalization mean"]),
    ({"mean": (0.5, True, 0.5)}, ["normalization mean"]),
    ({"std": (0.5, math.inf, 0.5)}, ["normalization std must be three"]),
    ({"mean": (math.nan, 0.5, 0.5)}, ["normalization mean"]),
    ({"std": (0.5, 0.0, 0.5)}, ["normalization std must be positive, got [0.5, 0.0, 0.5]"]),
    ({"std": (0.5, 0.5, -1)}, ["must be positive"]),
])
def test_bad_preprocessing_is_refused_with_what_is_wrong(kw, words):
    with pytest.raises(MixerError) as error:
        Preprocessing(**kw)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_preprocessing_round_trips_through_its_dict_and_refuses_other_shapes():
    d = CHANNELS.to_dict()
    assert d == {"resize": "stretch", "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}
    assert Preprocessing.from_dict(d) == CHANNELS
    for bad in ({"resize": "stretch", "mean": [0.5] * 3}, {**d, "extra": 1}, [d], None):
        with pytest.raises(MixerError, match="exactly resize, mean and std"):
            Preprocessing.from_dict(bad)
    for bad in ({**d, "mean": (0.1, 0.2, 0.3)}, {**d, "std": "0.5"}):
        with pytest.raises(MixerError, match="must be lists"):
            Preprocessing.from_dict(bad)


def test_standardize_is_per_channel_and_keeps_dtype():
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    out = CHANNELS.standardize(x)
    assert out.dtype == torch.float64 and out.shape == x.shape
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - CHANNELS.mean[c]) / CHANNELS.std[c])


def test_to_float_is_channels_first_in_unit_range():
    images = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).view(2, 2, 3, 3) * 7
    out = to_float(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 3)
    torch.testing.assert_close(out, images.permute(0, 3, 1, 2).float() / 255.0)
    assert images.dtype == torch.uint8 and int(images.max()) == 35 * 7  # the input is left as it is


# ---- evaluation --------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_split_logits_are_every_image_in_order_and_leave_the_mode_as_it_was(training):
    model, s = tiny(), split()
    with torch.no_grad():
        expected = model.eval()(model_input(s))
    model.train(training)
    logits, labels = split_logits(model, s, CHANNELS, batch_size=3)
    assert model.training is training
    assert logits.dtype == torch.float32 and logits.shape == (7, 3)
    torch.testing.assert_close(logits, expected)
    assert labels.tolist() == s.labels.tolist()
    empty, no_labels = split_logits(model, split(0), CHANNELS, batch_size=3)
    assert empty.shape == (0, 3) and len(no_labels) == 0


class FakeAccelerator:
    """Rank `rank` of `world`, whose other ranks computed `full`'s rows r, r + world, ..."""

    def __init__(self, rank, world, full):
        self.process_index, self.num_processes, self.device, self.full = rank, world, "cpu", full

    def pad_across_processes(self, x, dim=0):
        n = math.ceil(len(self.full) / self.num_processes)
        return torch.cat([x, torch.full((n - len(x), x.shape[1]), -99.0)])

    def gather(self, x):
        pieces = [self.pad_across_processes(self.full[r::self.num_processes]) for r in range(self.num_processes)]
        pieces[self.process_index] = x
        return torch.cat(pieces)


@pytest.mark.parametrize(("rank", "world"), [(0, 2), (1, 2), (2, 3)])
def test_sharded_logits_are_gathered_back_into_order_each_row_once(rank, world):
    model, s = tiny(), split()
    with torch.no_grad():
        full = model.eval()(model_input(s))
    logits, labels = split_logits(model, s, CHANNELS, 2, accelerator=FakeAccelerator(rank, world, full))
    torch.testing.assert_close(logits, full)
    assert labels.tolist() == s.labels.tolist()


def test_evaluate_split_is_the_cross_entropy_and_top1_accuracy():
    model, s = tiny(), split(n=9)
    with torch.no_grad():
        logits = model.eval()(model_input(s))
    labels = torch.from_numpy(s.labels)
    result = evaluate_split(model, s, CHANNELS, batch_size=4)
    assert set(result) == {"loss", "accuracy"}
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert 0 < result["accuracy"] < 1  # the check above tells right from wrong answers


# ---- probe -------------------------------------------------------------------------------------

def test_freeze_features_leaves_only_the_head_learning_and_eval_frozen_only_the_head_training():
    model = tiny()
    freeze_features(model)
    learning = {n for (n, p) in model.named_parameters() if p.requires_grad}
    assert learning == {"head.weight", "head.bias"}
    model.train()
    eval_frozen(model)
    assert model.head.training
    assert not any(m.training for (n, m) in model.named_modules() if n and not n.startswith("head"))


@pytest.mark.parametrize("training", [True, False])
def test_features_of_are_the_pooled_features_in_eval_mode(training):
    model, s = tiny(), split()
    with torch.no_grad():
        expected = model.eval().forward_head(model.forward_features(model_input(s)), pre_logits=True)
    model.train(training)
    out = features_of(model, s, CHANNELS, batch_size=3, device="cpu")
    assert model.training is training
    assert out.shape == (7, 8) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, expected)
    assert features_of(model, split(0), CHANNELS, 3, "cpu").shape == (0, 8)


def test_features_are_computed_once_on_first_use_and_gathered_by_row():
    model, s = tiny(), split()
    features = Features(model, s, CHANNELS, 3, "cpu")
    assert len(features) == 7 and features.features is None
    calls = []
    compute = features._compute
    features._compute = lambda: calls.append(1) or compute()
    rows = np.array([5, 0, 2])
    x, y = features.gather(rows)
    x2, y2 = features.batch(np.array([1]), "cpu")
    assert calls == [1]
    expected = features_of(model, s, CHANNELS, 3, "cpu")
    torch.testing.assert_close(x, expected[[5, 0, 2]])
    torch.testing.assert_close(x2, expected[[1]])
    assert y.tolist() == [2, 0, 2] and y2.tolist() == [1]
    assert Features.on_device(x) is x and AS_IS.standardize(x) is x


def test_the_probe_learner_trains_the_head_on_cached_features_and_delivers_the_whole_model():
    model, s = tiny(), split()
    head = model.head
    cached = learner(model, s, s, CHANNELS, 3, "cpu", cache=True)
    assert isinstance(cached.module, Probe) and cached.module.head is head
    assert isinstance(cached.train, Features) and isinstance(cached.val, Features)
    assert cached.preprocessing is AS_IS and cached.fingerprint == {"trains": "head"}
    x = torch.randn(4, 8)
    torch.testing.assert_close(cached.module(x), head(x))
    trained = Probe(torch.nn.Linear(8, 3))
    whole = cached.deliver(trained)
    assert whole is model and model.head is trained.head
    assert with_head(tiny(), trained).head is trained.head
    assert [n for (n, p) in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]

    model = tiny()
    direct = learner(model, s, s, CHANNELS, 3, "cpu", cache=False)
    assert direct.module is model and direct.train is s and direct.preprocessing is CHANNELS
    assert direct.deliver(model) is model and direct.fingerprint == {}
    model.train()
    direct.train_mode(model)
    assert model.head.training and not model.blocks.training


def test_a_plain_learner_trains_the_whole_module():
    model, s = tiny(), split()
    plain = Learner(model, s, s, CHANNELS)
    model.eval()
    plain.train_mode(model)
    assert model.training and all(m.training for m in model.modules())
    assert plain.deliver(model) is model and plain.fingerprint == {} and Learner(model, s, s, CHANNELS).fingerprint \
        is not plain.fingerprint


# ---- optim -------------------------------------------------------------------------------------

def test_param_groups_leave_out_frozen_parameters():
    model = tiny()
    freeze_features(model)
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [model.head.weight.shape]
    assert [p.shape for p in no_decay["params"]] == [model.head.bias.shape]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_build_optimizer_sets_lr_momentum_decay_and_kernel(name, fused):
    model = tiny()
    opt = build_optimizer(model, name, lr=0.25, momentum=0.7, weight_decay=0.05, fused=fused)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["lr"] == 0.25 for g in opt.param_groups)
    if name == "sgd":
        assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.7
    else:
        assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.7, 0.999)
    assert bool(opt.defaults["fused"]) is fused
    with pytest.raises(MixerError, match="optimizer must be 'sgd' or 'adamw', got 'adam'"):
        build_optimizer(model, "adam", lr=0.25, momentum=0.7, weight_decay=0.0)


def test_use_fused_and_wants_fused():
    opt = build_optimizer(tiny(), "adamw", 0.1, 0.9, 0.0)
    use_fused(opt, True)
    assert all((g["fused"], g["foreach"]) == (True, None) for g in opt.param_groups)
    use_fused(opt, False)
    assert all((g["fused"], g["foreach"]) == (None, None) for g in opt.param_groups)
    assert wants_fused("cuda") and wants_fused(torch.device("cuda", 1)) and not wants_fused("cpu")


def test_ema_is_a_frozen_copy_that_averages_buffers_and_saves_its_count():
    model = tiny()
    model.register_buffer("seen", torch.zeros(2))
    ema = make_ema(model, 0.75)
    assert isinstance(ema, EMA) and ema.decay == 0.75 and ema.updates == 0 and ema.module is not model
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert make_ema(model, 1e-9) is not None and make_ema(model, -0.5) is None
    model.seen += 4.0
    ema.update_parameters(model)  # the first copies
    torch.testing.assert_close(ema.module.seen, torch.full((2,), 4.0))
    model.seen += 4.0
    ema.update_parameters(model)
    torch.testing.assert_close(ema.module.seen, torch.full((2,), 0.75 * 4 + 0.25 * 8))
    assert ema.updates == 2 and ema.to("cpu") is ema
    state = ema.state_dict()
    assert set(state) == {"module", "updates"} and state["updates"] == 2
    other = make_ema(tiny(seed=5), 0.75)
    other.module.register_buffer("seen", torch.zeros(2))
    other.load_state_dict({"module": state["module"], "updates": torch.tensor(2)})
    assert other.updates == 2 and type(other.updates) is int
    torch.testing.assert_close(other.module.head.weight, ema.module.head.weight)


def test_evaluate_split_scores_the_sharded_logits_and_the_optimizer_defaults_to_torchs_kernel():
    model, s = tiny(), split(n=9)
    with torch.no_grad():
        full = model.eval()(model_input(s))
    wrong = full.clone()
    wrong[1::2] = -wrong[1::2]  # what the other rank "computed": evaluate_split must use the gathered rows
    result = evaluate_split(model, s, CHANNELS, 4, accelerator=FakeAccelerator(0, 2, wrong))
    assert result["loss"] == pytest.approx(float(F.cross_entropy(wrong, torch.from_numpy(s.labels))), rel=1e-5)
    assert not build_optimizer(model, "sgd", 0.1, 0.9, 0.0).defaults.get("fused")


def test_use_fused_resets_a_loaded_foreach_and_ema_off_at_zero():
    opt = build_optimizer(tiny(), "sgd", 0.1, 0.9, 0.0)
    for g in opt.param_groups:
        g["foreach"] = True  # as a checkpoint written elsewhere may say
    use_fused(opt, False)
    assert all(g["foreach"] is None for g in opt.param_groups)
    assert make_ema(tiny(), 0.0) is None


def test_standardize_keeps_half_precision_and_is_exact_in_double():
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    out = CHANNELS.standardize(x)
    for c in range(3):
        torch.testing.assert_close(out[:, c], (x[:, c] - CHANNELS.mean[c]) / CHANNELS.std[c], rtol=0, atol=1e-15)
    assert CHANNELS.standardize(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_probe_learners_features_are_the_models_features_of_each_split():
    model, train, val = tiny(), split(n=7, seed=1), split(n=5, seed=2)
    expected_train = features_of(model, train, CHANNELS, 3, "cpu")
    expected_val = features_of(model, val, CHANNELS, 3, "cpu")
    cached = learner(model, train, val, CHANNELS, 3, "cpu", cache=True)
    torch.testing.assert_close(cached.train.gather(np.arange(7))[0], expected_train)
    torch.testing.assert_close(cached.val.gather(np.arange(5))[0], expected_val)
    direct = learner(model, train, val, CHANNELS, 3, "cpu", cache=False)
    assert direct.train is train and direct.val is val


# ---- augment -----------------------------------------------------------------------------------

def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pixels(n=6, h=10, w=14, dtype=torch.float32, seed=3):
    return torch.randint(20, 236, (n, 3, h, w), generator=gen(seed)).to(dtype) / 255


def warp(x, theta):
    """The reference resampling: bilinear through the affine map, outside the image mid-grey."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def draws(global_seed):
    torch.manual_seed(global_seed)  # the global generator must not matter, only the one passed
    x, g = pixels(), gen(11)
    return (random_resized_crop_boxes(50, (0.1, 0.5), (0.5, 2.0), g, "cpu"), hflip(x, 0.5, g),
            random_resized_crop(x, (0.2, 0.6), (0.5, 2.0), g), randaugment(x, 2, 9, g), _uniform(5, 0.0, 1.0, g, "cpu"))


def test_every_draw_comes_from_the_given_generator():
    for (a, b) in zip(draws(1), draws(2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_crop_boxes_cover_the_whole_scale_and_ratio_ranges():
    cx, cy, w, h = random_resized_crop_boxes(4000, (0.05, 0.5), (0.5, 2.0), gen(), "cpu").unbind(1)
    area, aspect = w * h, w / h
    assert area.min() < 0.07 and area.max() > 0.48
    assert aspect.min() < 0.55 and aspect.max() > 1.8 and abs(float(aspect.log().median())) < 0.1
    assert (cx - w / 2).min() < 0.01 and (cx + w / 2).max() > 0.99
    assert (cy - h / 2).min() < 0.01 and (cy + h / 2).max() > 0.99


def test_a_crop_samples_its_box_and_keeps_the_dtype():
    x = pixels(dtype=torch.float64)
    y = random_resized_crop(x, (0.2, 0.6), (0.5, 2.0), gen(5))
    cx, cy, w, h = random_resized_crop_boxes(len(x), (0.2, 0.6), (0.5, 2.0), gen(5), "cpu").unbind(1)
    theta = torch.zeros(len(x), 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, 2 * cx - 1, h, 2 * cy - 1
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, warp(x, theta))


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y"])
def test_geometric_ops_are_their_affine_maps(name):
    x = pixels(dtype=torch.float64)
    level = torch.tensor([0.5, -1.0, 0.2, 0.0, 1.0, -0.3], dtype=torch.float64)
    theta = torch.eye(2, 3, dtype=torch.float64).repeat(len(x), 1, 1)
    angle = level * math.pi / 6  # 30 degrees at full magnitude
    if name == "rotate":
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = (angle.cos(), -angle.sin(), angle.sin(),
                                                                          angle.cos())
    else:
        (row, col, scale) = {"shear_x": (0, 1, 0.3), "shear_y": (1, 0, 0.3), "translate_x": (0, 2, 0.9),
                             "translate_y": (1, 2, 0.9)}[name]
        theta[:, row, col] = scale * level
    torch.testing.assert_close(_op(x, name, level), warp(x, theta))


def luma(x):
    return ((0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]) / (0.299 + 0.587 + 0.114))[:, None]


def test_grey_is_the_luma_of_the_channels():
    x = pixels(h=2, w=5, dtype=torch.float64)
    torch.testing.assert_close(_grey(x), luma(x), rtol=0, atol=1e-15)
    torch.testing.assert_close(_grey(x[:, :1]), x[:, :1], rtol=0, atol=1e-15)  # one channel: itself


def test_colour_ops_follow_their_definitions():
    x = pixels(dtype=torch.float64)
    level = torch.tensor([0.5, -0.4, 0.9, -1.0, 0.1, 0.3], dtype=torch.float64)
    f = (1 + 0.9 * level)[:, None, None, None]
    grey = luma(x).expand_as(x)
    mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(_op(x, "brightness", level), (x * f).clamp(0, 1))
    torch.testing.assert_close(_op(x, "contrast", level), (mean + (x - mean) * f).clamp(0, 1))
    torch.testing.assert_close(_op(x, "color", level), (grey + (x - grey) * f).clamp(0, 1))
    threshold = (1 - level.abs())[:, None, None, None]
    torch.testing.assert_close(_op(x, "solarize", level), torch.where(x >= threshold, 1 - x, x))


def test_posterize_keeps_the_top_bits_and_autocontrast_leaves_a_flat_channel():
    k = torch.randint(0, 256, (4, 3, 6, 6), generator=gen(2))
    x = k.double() / 255
    level = torch.tensor([1.0, 0.3, -0.6, 0.0], dtype=torch.float64)
    bits = torch.tensor([4, 7, 6, 8])  # 8 - round(4 |level|)
    step = (2 ** (8 - bits))[:, None, None, None]
    torch.testing.assert_close(_op(x, "posterize", level), (k // step * step).double() / 255, rtol=0, atol=1e-12)
    flat = x.clone()
    flat[:, 0] = 0.4
    out = _op(flat, "autocontrast", level)
    torch.testing.assert_close(out[:, 0], flat[:, 0])
    assert (out[:, 1:].amin(dim=(2, 3)) == 0).all() and (out[:, 1:].amax(dim=(2, 3)) == 1).all()


def test_randaugment_applies_one_drawn_op_per_image_per_round_at_magnitude_m_over_30():
    x = pixels(n=24)
    out = randaugment(x, 2, 12, gen(9))
    g, expected = gen(9), x
    for _ in range(2):
        choice = torch.randint(len(RANDAUGMENT_OPS), (24,), generator=g)
        sign = torch.where(torch.rand(24, generator=g) < 0.5, -1.0, 1.0)
        expected = torch.cat([_op(expected[i:i + 1], RANDAUGMENT_OPS[int(c)], sign[i:i + 1] * 12 / 30)
                              for (i, c) in enumerate(choice)])
    assert len(set(choice.tolist())) > 6
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("cfg", [
    AugmentConfig(crop_scale=(0.3, 0.9), hflip=0.5, randaugment_n=2, randaugment_m=7, mixup=0.4),
    AugmentConfig(hflip=0.5, randaugment_n=1, cutmix=1.0),
    AugmentConfig(crop_scale=(0.3, 0.9), crop_ratio=(0.5, 2.0), randaugment_n=1, randaugment_m=20),
])
def test_augment_is_crop_then_flip_then_randaugment_then_mix(cfg):
    x, t = pixels(n=8), F.one_hot(torch.arange(8) % 5, 5).float()
    out, targets = augment(x, t, cfg, gen(4))
    g, y = gen(4), x
    if cfg.crop_scale != (1.0, 1.0):
        y = random_resized_crop(y, cfg.crop_scale, cfg.crop_ratio, g)
    if cfg.hflip > 0:
        y = hflip(y, cfg.hflip, g)
    if cfg.randaugment_n:
        y = randaugment(y, cfg.randaugment_n, cfg.randaugment_m, g)
    y, t2 = mix(y, t, cfg.mixup, cfg.cutmix, g)
    torch.testing.assert_close(out, y)
    torch.testing.assert_close(targets, t2)


def reference_mix(x, t, mixup, cutmix, seed):
    """mix's definition: the decision, lam ~ Beta(alpha, alpha) and the box drawn by the host generator of the seed."""
    host = np.random.default_rng([seed, 0x6D6978])
    cut = cutmix > 0 and (mixup == 0 or host.random() < 0.5)
    alpha = cutmix if cut else mixup
    if alpha <= 0:
        return x, t, None
    lam = float(betaincinv(alpha, alpha, host.random()))
    if not cut:
        return x * lam + x.flip(0) * (1 - lam), t * lam + t.flip(0) * (1 - lam), "mixup"
    H, W = x.shape[2:]
    half_h, half_w = int(H * math.sqrt(1 - lam)) // 2, int(W * math.sqrt(1 - lam)) // 2
    cy, cx = int(host.integers(H)), int(host.integers(W))
    rows, cols = slice(max(cy - half_h, 0), min(cy + half_h, H)), slice(max(cx - half_w, 0), min(cx + half_w, W))
    out = x.clone()
    out[:, :, rows, cols] = x.flip(0)[:, :, rows, cols]
    kept = 1 - (rows.stop - rows.start) * (cols.stop - cols.start) / (H * W)
    return out, t * kept + t.flip(0) * (1 - kept), "cutmix"


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.0, 0.3), (0.4, 1.0), (2.0, 0.5), (0.0, 0.0)])
def test_mix_follows_its_definition_whatever_the_seed(mixup, cutmix):
    x, t = pixels(n=6, h=10, w=14), F.one_hot(torch.tensor([0, 1, 2, 3, 4, 0]), 5).float()
    kinds = set()
    for seed in range(12):
        out, targets = mix(x, t, mixup, cutmix, gen(seed))
        want_x, want_t, kind = reference_mix(x, t, mixup, cutmix, seed)
        kinds.add(kind)
        torch.testing.assert_close(out, want_x)
        torch.testing.assert_close(targets, want_t)
    assert kinds == ({"mixup"} if cutmix == 0 and mixup > 0 else {"cutmix"} if mixup == 0 and cutmix > 0
                     else {None} if mixup == cutmix == 0 else {"mixup", "cutmix"})


# ---- engine (the pieces a unit test reaches in milliseconds) -----------------------------------

def test_an_interrupted_run_says_where_it_stopped_in_one_based_epochs():
    from pathlib import Path

    from mixer.engine import Interrupted
    from mixer.train_state import TrainState

    error = Interrupted(TrainState({}, epoch=2, step=17), Path("run/checkpoint.pt"))
    assert str(error) == "stopped at epoch 3, step 17; run/checkpoint.pt holds the run"
    assert error.state.step == 17 and error.path == Path("run/checkpoint.pt")


def test_device_sums_add_in_double_precision():
    from types import SimpleNamespace

    from mixer.engine import TrainConfig, _DeviceSums
    from mixer.train_state import RunningSums

    sums = _DeviceSums(RunningSums(loss=2.0 ** 25, correct=3.0, images=4.0), "cpu")
    assert sums.values.dtype == torch.float64
    sums.add(torch.tensor(0.25), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]), step=0)
    out = sums.read(SimpleNamespace(num_processes=1), TrainConfig(), epoch=0)
    assert out == RunningSums(2.0 ** 25 + 0.5, 4.0, 6.0)  # float32 would round the loss to 2**25


class TwoProcesses:
    """accelerate's `reduce` over this process and one other, whose sums are `other` and which had no
    bad step (so a "max" is this process's own value, however the bad step is encoded)."""

    num_processes = 2

    def __init__(self, other):
        self.other = torch.tensor(other, dtype=torch.float64)

    def reduce(self, t, op):
        if op == "sum":
            return t + self.other[:len(t)]
        if op == "max":
            return t
        raise ValueError(op)


def test_device_sums_count_loss_correct_images_and_the_first_bad_step_over_processes():
    from types import SimpleNamespace

    from mixer.engine import TrainConfig, _DeviceSums
    from mixer.train_state import RunningSums

    one, cfg = SimpleNamespace(num_processes=1), TrainConfig(lr=0.5)
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    sums = _DeviceSums(RunningSums(1.0, 1.0, 1.0), "cpu")
    sums.add(torch.tensor(0.5), logits, torch.tensor([1, 1, 1]), step=4)  # 2 of 3 right
    sums.add(torch.tensor(1.5), logits[:2], torch.tensor([0, 0]), step=5)  # 1 of 2
    assert sums.read(one, cfg, epoch=0) == RunningSums(1.0 + 0.5 * 3 + 1.5 * 2, 4.0, 6.0)
    assert sums.read(TwoProcesses([10.0, 1.0, 4.0]), cfg, 0) == RunningSums(15.5, 5.0, 10.0)

    bad = _DeviceSums(RunningSums(), "cpu")
    bad.add(torch.tensor(math.nan), logits[:1], torch.tensor([0]), step=0)  # the first bad step is kept
    bad.add(torch.tensor(math.inf), logits[:1], torch.tensor([0]), step=1)
    with pytest.raises(MixerError, match=r"diverged at epoch 3, step 0: the loss is nan; lower lr \(now 0.5\)"):
        bad.read(one, cfg, epoch=2)
    with pytest.raises(MixerError, match="diverged at epoch 3, step 0"):
        bad.read(TwoProcesses([10.0, 1.0, 4.0]), cfg, epoch=2)
