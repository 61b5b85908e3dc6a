"""Every declared training key changes what training computes, or is declared not to.

The walk is over `pipeline.params.KEYS`: a new key is covered without a new test. For each key that
the train stage reads, two other valid values are found from its declaration (its type, its rule)
and a tiny model is trained a few steps with the same functions `mixer train` runs (build_model,
train_config, mixer.engine.train). The weights must differ from the default's, from each other's
(the value is used, not only whether it is on), and from the initial weights (training ran with
it). A key declared `affects=False` must leave the weights bit for bit as they were.

It fails when any one key's use is removed, e.g.
  - `label_smoothing=config.label_smoothing` dropped from the loss in mixer/engine.py;
  - `ema.update_parameters(...)` never called: the EMA stays the initial weights;
  - `hflip(x, config.hflip, g)` made `hflip(x, 0.5, g)` in mixer/augment.py: two values, one result.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from conftest import ROOT
from mixer.checkpoint import save_model
from mixer.data import Split
from mixer.engine import Machine, train
from mixer.errors import MixerError
from mixer.model import create_model
from mixer.pretrained import load_pretrained
from pipeline.params import KEYS, input_shape, load_params
from pipeline.train import build_model, train_config

# The tiny run every case starts from: the committed params, shrunk so that each key is visible.
BASE = {"num_steps": 3, "warmup_step": 1, "batch_size": 16, "dim": 16, "depth": 2, "num_classes": 3,
        "randaugment_n": 1}  # randaugment_m matters only with an operation
# What a value needs beside it (a variant's patch needs a larger image; a probe needs a checkpoint).
WITH = {"variant": {"image_shape": [32, 32], "patch_shape": [4, 4]}, "freeze": {"checkpoint": "<model 7>"}}
# Values the declaration cannot suggest: paths to what the test makes.
EXAMPLES = {"checkpoint": ["<model 7>", "<model 8>"], "output_dir": ["elsewhere"]}
IMAGES = 96


def candidates(key, value) -> list:
    """Other values of the key's type, nearest first; the rule and the other params sort out which are valid."""
    kind = key.base
    if key.name in EXAMPLES:
        return EXAMPLES[key.name]
    rule = key.declaration.rule
    if rule is not None and rule.choices:
        return [c for c in rule.choices if c != value]
    if value is None:
        return {int: [3, 5], float: [0.5, 0.1]}.get(kind, [])  # not the widths null gives (dim/2, 4·dim)
    if typing.get_origin(kind) is tuple:
        return [tuple(v * f for v in value) for f in (2, 0.5, 3)] + [tuple(type(v)(v + 1) for v in value)]
    if kind is bool:
        return [not value]
    if kind is int:
        return [value + 1, value * 2, value + 2, value - 1]
    if kind is float:
        return [value * 0.1, value + 0.1, 0.5, 0.1, value * 3, 1e-3, 1e-4]
    return []


def params(tmp_path, **change):
    values = {**BASE, **change}
    for (k, v) in values.items():
        if isinstance(v, str) and v.startswith("<model "):
            values[k] = str(pretrained_model(tmp_path, int(v[7:-1])))
    return load_params(ROOT / "params.yaml", values)


def pretrained_model(tmp_path, seed):
    path = tmp_path / f"pretrained-{seed}"
    if not path.exists():
        torch.manual_seed(seed)
        model = create_model(image_shape=(12, 12), patch_shape=(3, 3), depth=2, dim=16, num_classes=3)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.2)
        save_model(model, path)
    return path


def alternatives(tmp_path, name) -> list:
    """Up to two valid other values of `name`, each with the params it needs beside it."""
    base = params(tmp_path, **WITH.get(name, {}))
    found = []
    for value in candidates(KEYS[name], getattr(base, name)):
        if value == getattr(base, name):
            continue
        try:
            p = params(tmp_path, **{**WITH.get(name, {}), name: list(value) if isinstance(value, tuple) else value})
            run_setup(p)
        except MixerError:
            continue
        if getattr(p, name) not in [getattr(q, name) for q in found]:
            found.append(p)
        if len(found) == 2:
            break
    return found


def synthetic(shape, classes, n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, *shape, 3), dtype=np.uint8)
    for c in range(classes):  # a learnable signal: a bright band per class
        images[labels == c, (c * shape[0]) // classes] = 255
    return Split(images, labels.astype(np.int64), [f"{i}.png" for i in range(n)], [f"c{c}" for c in range(classes)])


def run_setup(p):
    pretrained = load_pretrained(p.checkpoint) if p.checkpoint is not None else None
    shape = input_shape(p, pretrained and pretrained.config)
    classes = pretrained.config.num_classes if pretrained is not None and p.num_classes is None else p.num_classes
    data = synthetic(shape, classes, IMAGES, 0)
    model = build_model(p, data.classes, p.resize, shape, pretrained)
    return model, data, synthetic(shape, classes, 24, 1), train_config(p)


def trained(p, folder):
    """(initial weights, final weights) of a tiny run with params `p`."""
    model, data, val, config = run_setup(p)
    initial = {k: v.clone() for (k, v) in model.state_dict().items()}
    result = train(model, data, val, config, model.preprocessing, folder, machine=Machine(), resume=False)
    return initial, {k: v.detach().clone() for (k, v) in result.model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


TRAIN_KEYS = [k for k in KEYS.values() if "train" in k.declaration.stages]


@pytest.mark.parametrize("name", [k.name for k in TRAIN_KEYS])
def test_every_training_key_changes_the_weights_or_is_declared_not_to(tmp_path, name):
    torch.set_num_threads(1)
    _, base = trained(params(tmp_path, **WITH.get(name, {})), tmp_path / "base")
    others = alternatives(tmp_path, name)
    assert others, f"{name}: no other valid value found; give its rule choices or a WITH entry"
    runs = []
    for (i, p) in enumerate(others):
        initial, weights = trained(p, tmp_path / f"run{i}")
        if not KEYS[name].declaration.affects:
            assert same(weights, base), f"{name}={getattr(p, name)!r} changed the weights but is declared not to"
            continue
        assert not same(weights, base), f"{name}={getattr(p, name)!r} trains the same weights as the default"
        assert not same(weights, initial), f"{name}={getattr(p, name)!r}: the weights never moved"
        runs.append(weights)
    if len(runs) == 2:
        assert not same(*runs), f"{name}: two values train the same weights (only on/off is used)"


def test_only_where_the_model_goes_and_how_evaluation_batches_are_declared_not_to_decide_results():
    assert {k.name for k in TRAIN_KEYS if not k.declaration.affects} == {"output_dir", "eval_batch_size"}
