"""The training engine: optimizer grouping, EMA, batching across processes, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer.data import Split
from mixer.engine import (Machine, TrainConfig, build_optimizer, epoch_batches, make_ema, param_groups,
                          train)
from mixer.errors import MixerError
from mixer.model import create_model


def tiny_model(classes=3):
    return create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=2, dim=16, num_classes=classes)


def tiny_split(n=48, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, 8, 8, 3), dtype=np.uint8)
    images[np.arange(n), labels * 2, :, :] = 255  # a learnable signal: a bright row per class
    return Split(images, labels.astype(np.int64), [f"{i}.png" for i in range(n)], [str(c) for c in range(classes)])


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for (n, p) in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for (n, p) in model.named_parameters()
                                                         if n.endswith("bias") or "norm" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_optimizers_follow_the_params():
    model = tiny_model()
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", momentum=0.8, lr=0.1))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", momentum=0.9, lr=0.1))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(MixerError):
        build_optimizer(model, TrainConfig(optimizer="lion"))


def test_ema_update_matches_the_formula():
    model = tiny_model()
    ema = make_ema(model, 0.9)
    start = {k: v.clone() for (k, v) in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)  # first update copies (torch's AveragedModel starts from the model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for (name, p) in ema.module.named_parameters():
        expected = 0.9 * (start[name] + 1) + 0.1 * (start[name] + 2)
        torch.testing.assert_close(p, expected)
    assert make_ema(model, 0.0) is None


def test_two_processes_see_what_one_sees_with_twice_the_batch():
    one = epoch_batches(100, TrainConfig(batch_size=8, seed=3), epoch=2, rank=0, world=1)
    config = TrainConfig(batch_size=4, seed=3)
    r0 = epoch_batches(100, config, epoch=2, rank=0, world=2)
    r1 = epoch_batches(100, config, epoch=2, rank=1, world=2)
    assert len(one) == len(r0) == len(r1) == 12
    for (a, b, c) in zip(one, r0, r1):
        assert list(a) == list(b) + list(c)
    every = np.concatenate(one)
    assert len(set(every)) == len(every) == 96  # each image at most once; the partial batch dropped
    assert list(epoch_batches(100, config, 3, 0, 2)[0]) != list(r0[0])  # reshuffled each epoch


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(MixerError, match="exceeds the 48 training images"):
        train(tiny_model(), tiny_split(), tiny_split(12), TrainConfig(batch_size=64, epochs=1), tmp_path,
              Machine(progress=False))


class Crash(Exception):
    pass


def run(tmp_path, epochs, resume=False, crash_after=None, **kw):
    config = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, optimizer="adamw", warmup_epochs=1,
                         seed=5, **kw)
    torch.manual_seed(123)  # the model's initialisation

    def logger(metrics):  # called once an epoch's checkpoint is on disk
        if metrics["epoch"] == crash_after:
            raise Crash

    model = tiny_model()
    metrics = train(model, tiny_split(), tiny_split(12, seed=1), config, tmp_path, Machine(progress=False),
                    resume, logger)
    return model, metrics


def test_same_seed_same_weights_and_the_model_learns(tmp_path):
    a, metrics = run(tmp_path / "a", 4)
    b, _ = run(tmp_path / "b", 4)
    for (x, y) in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert metrics["train/accuracy"] > 0.9
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "config.json").is_file()
    assert (tmp_path / "a" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "a" / "checkpoints" / "best.pt").is_file()


def test_resume_replays_the_rest_of_the_run_exactly(tmp_path):
    from mixer.augment import AugmentConfig

    kw = dict(augment=AugmentConfig(crop_scale=(0.5, 1.0), mixup=0.2), ema_decay=0.9)
    full, _ = run(tmp_path / "full", 3, **kw)
    with pytest.raises(Crash):
        run(tmp_path / "part", 3, crash_after=2, **kw)
    resumed, metrics = run(tmp_path / "part", 3, resume=True, **kw)
    assert metrics["epoch"] == 3
    for (x, y) in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(MixerError, match="cannot resume: no checkpoint"):
        run(tmp_path, 1, resume=True)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    base = dict(epochs=2, lr=0.05, optimizer="sgd", warmup_epochs=0, seed=2, clip_grad=0.0)
    results = []
    for (batch, accum) in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = tiny_model()
        train(model, tiny_split(), tiny_split(12, seed=1), TrainConfig(batch_size=batch, grad_accum=accum, **base),
              tmp_path / f"{batch}", Machine(progress=False))
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=0)
