"""The training loop: what it runs, that a run continues exactly from any checkpoint, and that it refuses
to continue another run's (each run checkpoints into a folder of its own, named by its fingerprint, under
the folder it is given: run_dir/<key>/last.pt, best/, fingerprint.json)."""

from __future__ import annotations

import json
import os
import re
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import only_run
from mixer import engine, train_state
from mixer.augment import AugmentConfig
from mixer.checkpoint import load_model, read_config, save_model
from mixer.data import Split
from mixer.engine import Interrupted, Machine, Reporter, TrainConfig, epoch_batches, train
from mixer.errors import MixerError
from mixer.model import create_model
from mixer.optim import build_optimizer, make_ema, param_groups
from mixer.preprocess import Preprocessing
from mixer.resources import format_bytes
from mixer.train_state import CheckpointTimer, Every

PREP = Preprocessing()


def tiny_model(classes=3, **kw):
    torch.manual_seed(123)
    return create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=2, dim=16, num_classes=classes, **kw)


def tiny_split(n=48, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n, 8, 8, 3), dtype=np.uint8)
    images[np.arange(n), labels * 2, :, :] = 255  # a learnable signal: a bright row per class
    return Split(images, labels.astype(np.int64), [f"{i}.png" for i in range(n)], [str(c) for c in range(classes)])


def config(**kw):
    """The library's default run, shrunk: every field has its declared default unless given."""
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "seed": 5,
                            "augment": AugmentConfig(), **kw})


class Crash(Exception):
    pass


class Record(Reporter):
    """Counts what the loop did; can crash the run or ask it to stop at a given optimizer step."""

    def __init__(self, crash_at=None, stop_at=None, stop=None):
        self.steps, self.epochs, self.checkpoints, self.notes = [], [], [], []
        self.crash_at, self.stop_at, self.stop = crash_at, stop_at, stop
        self.history_at_start = None

    def start(self, state, epochs, steps_per_epoch):
        self.history_at_start = [m["epoch"] for m in state.history]

    def step(self, state):
        self.steps.append(state.step)
        if state.step == self.crash_at:
            raise Crash
        if state.step == self.stop_at:
            self.stop.set()

    def epoch(self, metrics):
        self.epochs.append(metrics["epoch"])

    def checkpoint(self, state, path, size, seconds):
        self.checkpoints.append((state.epoch, state.step_in_epoch, state.step))

    def note(self, text):
        self.notes.append(text)


def run(folder, cfg=None, resume=None, reporter=None, every=None, stop=None, fingerprint=None, model=None):
    model = model or tiny_model()
    result = train(model, tiny_split(), tiny_split(12, seed=1), cfg or config(), PREP, folder,
                   fingerprint or {"run": "test"}, Machine(checkpoint_every=every, stop=stop), resume,
                   reporter or Record())
    return result


def run_folders(root):
    """The run folders (12 hex characters, train_state.run_key) under a root, sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and train_state.KEY.fullmatch(p.name))


def on_disk(folder):
    """Bytes under `folder`, counted here (not by the library), for the notes that state them."""
    return sum(os.lstat(os.path.join(parent, f)).st_size for (parent, _, files) in os.walk(folder) for f in files)


def weights(result):
    return {k: v.clone() for (k, v) in result.model.state_dict().items()}


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


# 48 images, batch 8: 6 optimizer steps per epoch; 3 epochs: 18 steps

def test_same_seed_same_weights_and_the_model_learns(tmp_path):
    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert max_difference(weights(a), weights(b)) == 0
    assert a.metrics["train/accuracy"] > 0.9 and a.metrics["val/accuracy"] > 0.9
    folder = only_run(tmp_path / "a")
    assert a.folder == folder and sorted(p.name for p in (tmp_path / "a").iterdir()) == [folder.name]
    assert (folder / "last.pt").is_file() and (folder / "best" / "model.safetensors").is_file()
    saved = train_state.read(folder)["fingerprint"]
    assert folder.name == train_state.run_key(saved) and json.loads((folder / "fingerprint.json").read_text()) == saved
    other = run(tmp_path / "c", config(seed=6))  # the control: the seed matters
    assert max_difference(weights(a), weights(other)) > 1e-3


AUGMENTED = dict(augment=AugmentConfig(crop_scale=(0.5, 1.0), hflip=0.5, randaugment_n=1, mixup=0.2),
                 ema_decay=0.9)


# 6 steps an epoch, a checkpoint every 4 steps and at each epoch's end: at steps 4, 6, 10, 12, 16, 18.
# A crash at step 9 resumes from the end of epoch 1 (step 6); one at step 11 from inside epoch 2 (step 10).
@pytest.mark.parametrize(("crash_at", "saved"), [(9, 6), (11, 10)])
def test_a_crashed_run_continues_from_its_last_checkpoint_exactly(tmp_path, crash_at, saved):
    cfg = config(**AUGMENTED)
    straight = run(tmp_path / "straight", cfg, model=tiny_model(dropout=0.1, drop_path=0.1))
    first = Record(crash_at=crash_at)
    with pytest.raises(Crash):
        run(tmp_path / "part", cfg, reporter=first, every=Every(steps=4), model=tiny_model(dropout=0.1, drop_path=0.1))
    assert [c[2] for c in first.checkpoints] == [4, 6, 10][: 2 + (crash_at > 10)]
    assert first.steps[-1] == crash_at
    again = Record()
    resumed = run(tmp_path / "part", cfg, reporter=again, every=Every(steps=4),
                  model=tiny_model(dropout=0.1, drop_path=0.1))
    assert again.steps == list(range(saved + 1, 19))  # it continued: only the remaining steps ran
    assert any(n.startswith("continuing from") for n in again.notes)
    assert again.history_at_start == list(range(1, saved // 6 + 1))  # finished epochs came from the checkpoint
    assert max_difference(weights(straight), weights(resumed)) <= 1e-6
    assert [m["epoch"] for m in resumed.state.history] == [1, 2, 3]
    for (x, y) in zip(straight.state.history, resumed.state.history):  # the epochs' metrics too, not the speed
        assert {k: v for (k, v) in x.items() if k != "images_per_second"} == pytest.approx(
            {k: v for (k, v) in y.items() if k != "images_per_second"}, abs=1e-6)


def test_the_checkpoint_is_what_a_resume_continues_from(tmp_path):
    """Deterministic code could reach the same weights by starting over; a perturbed checkpoint shows it
    does not."""
    cfg = config()
    straight = run(tmp_path / "straight", cfg)
    with pytest.raises(Crash):
        run(tmp_path / "part", cfg, reporter=Record(crash_at=8), every=Every(steps=4))
    last = only_run(tmp_path / "part") / "last.pt"
    payload = torch.load(last, weights_only=True)
    payload["model"]["head.bias"] += 0.5
    torch.save(payload, last)
    resumed = run(tmp_path / "part", cfg)
    assert max_difference(weights(straight), weights(resumed)) > 1e-3


def test_stop_request_checkpoints_at_that_step_and_the_run_continues(tmp_path):
    cfg = config(**AUGMENTED)
    straight = run(tmp_path / "straight", cfg)
    stop = threading.Event()
    first = Record(stop_at=9, stop=stop)
    with pytest.raises(Interrupted) as caught:
        run(tmp_path / "part", cfg, reporter=first, stop=stop)
    assert first.steps[-1] == 9 and caught.value.state.step == 9 and first.checkpoints[-1] == (1, 3, 9)
    again = Record()
    resumed = run(tmp_path / "part", cfg, reporter=again)
    assert again.steps[0] == 10
    assert max_difference(weights(straight), weights(resumed)) <= 1e-6


def test_another_runs_checkpoint_is_never_loaded_silently_and_stays(tmp_path):
    """A run with other params gets a folder of its own: the other run's state stays, and continues when its
    params come back."""
    root = tmp_path / "run"
    run(root, config(lr=3e-3), fingerprint={"lr": 3e-3})
    old = only_run(root)
    kept = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(MixerError) as caught:
        run(root, config(lr=1e-3), resume=True, fingerprint={"lr": 1e-3})
    assert str(caught.value) == (f"cannot resume: {root} holds no checkpoint of this run, only of 1 other run(s) "
                                 "(the closest: lr 0.003 → 0.001); train without --resume to start this one")
    size = on_disk(old)
    fresh = Record()
    result = run(root, config(lr=1e-3), reporter=fresh, fingerprint={"lr": 1e-3})
    (new,) = (f for f in run_folders(root) if f != old)
    assert result.folder == new and run_folders(root) == sorted([old, new])
    assert fresh.steps[0] == 1 and fresh.notes == [
        f"starting a new run in {new}; 1 other run(s) stay in {root} ({format_bytes(size)}) and continue when "
        f"their params come back; `rm -r {root}/<run>` frees one"]
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == kept  # untouched
    assert train_state.read(new)["fingerprint"]["lr"] == 1e-3 and train_state.read(old)["fingerprint"]["lr"] == 3e-3
    back = Record()
    run(root, config(lr=3e-3), reporter=back, fingerprint={"lr": 3e-3})  # its params again: its own state
    assert back.steps == [] and back.notes == [f"{old / 'last.pt'} holds this run, complete: writing its model"]


def test_resume_without_a_checkpoint_starts_over_with_a_note(tmp_path):
    record = Record()
    result = run(tmp_path / "new", resume=True, reporter=record)
    folder = only_run(tmp_path / "new")
    assert result.folder == folder
    assert record.steps[0] == 1 and record.notes == [f"no checkpoint at {folder / 'last.pt'}: "
                                                     "starting from scratch"]


def test_a_finished_run_is_not_trained_again_unless_asked(tmp_path):
    first = run(tmp_path / "run")
    again = Record()
    second = run(tmp_path / "run", reporter=again)
    assert again.steps == [] and "complete" in again.notes[0]
    assert max_difference(weights(first), weights(second)) == 0
    over = Record()
    run(tmp_path / "run", resume=False, reporter=over)
    assert len(over.steps) == 18


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(Crash):  # a run that made its folder and wrote no checkpoint yet
        run(root, config(epochs=1), reporter=Record(crash_at=1))
    folder = only_run(root)
    assert not (folder / "last.pt").exists()
    (folder / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    again = Record()
    run(root, config(epochs=1), reporter=again)
    assert not list(folder.glob(".*.tmp")) and again.steps[0] == 1 and (folder / "last.pt").is_file()


def test_an_unreadable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "run"
    with pytest.raises(Crash):
        run(root, reporter=Record(crash_at=1))
    last = only_run(root) / "last.pt"
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(MixerError, match=f"^{re.escape(str(last))} is not a readable checkpoint"):
        run(root)
    assert last.read_bytes() == b"not a checkpoint"


def test_an_unreadable_checkpoint_of_the_old_layout_is_no_runs_state_and_stays(tmp_path):
    """Rank 0 alone adopts the old layout, before the others read their state: it never raises."""
    root = tmp_path / "run"
    root.mkdir()
    (root / "last.pt").write_bytes(b"not a checkpoint")
    record = Record()
    result = run(root, reporter=record)
    assert record.notes[0] == f"{root / 'last.pt'} is not readable: left as it is (delete it to free its space)"
    assert result.state.step > 0 and (root / "last.pt").read_bytes() == b"not a checkpoint"


def test_divergence_stops_the_run(tmp_path):
    with pytest.raises(MixerError, match="training diverged at epoch 1, step .*: the loss is nan; lower lr"):
        run(tmp_path / "run", config(lr=1e30, clip_grad=0.0, optimizer="sgd", warmup_epochs=0))


def test_batch_larger_than_data_is_a_clear_error(tmp_path):
    with pytest.raises(MixerError, match="exceeds the 48 training images"):
        run(tmp_path, config(batch_size=64))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    base = dict(lr=0.05, optimizer="sgd", warmup_epochs=0, clip_grad=0.0, epochs=2)
    big = run(tmp_path / "16", config(batch_size=16, **base))
    small = run(tmp_path / "8x2", config(batch_size=8, grad_accum=2, **base))
    assert max_difference(weights(big), weights(small)) <= 1e-5
    alone = run(tmp_path / "8", config(batch_size=8, **base))  # the control: more, smaller steps differ
    assert max_difference(weights(big), weights(alone)) > 1e-3


def test_two_processes_see_what_one_sees_with_twice_the_batch():
    one = epoch_batches(100, 8, seed=3, epoch=2, rank=0, world=1)
    r0 = epoch_batches(100, 4, seed=3, epoch=2, rank=0, world=2)
    r1 = epoch_batches(100, 4, seed=3, epoch=2, rank=1, world=2)
    assert len(one) == len(r0) == len(r1) == 12
    for (a, b, c) in zip(one, r0, r1):
        assert list(a) == list(b) + list(c)
    every = np.concatenate(one)
    assert len(set(every)) == len(every) == 96  # each image at most once; the partial batch dropped
    assert list(epoch_batches(100, 4, 3, 3, 0, 2)[0]) != list(r0[0])  # reshuffled each epoch


def test_no_weight_decay_on_norms_and_biases():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for (n, p) in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} == {n for (n, p) in model.named_parameters()
                                                         if n.endswith("bias") or "norm" in n}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_layer_decay_gives_each_block_lr_times_decay_to_its_distance_from_the_head(name):
    from mixer.schedule import build_scheduler

    torch.manual_seed(0)
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=3, dim=16, num_classes=3)
    optimizer = build_optimizer(model, name, lr=0.2, momentum=0.9, weight_decay=0.05, layer_decay=0.5)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    expected = {"stem": 0.2 * 0.5 ** 4, "blocks.0": 0.2 * 0.5 ** 3, "blocks.1": 0.2 * 0.5 ** 2,
                "blocks.2": 0.2 * 0.5, "norm": 0.2, "head": 0.2}  # block i: lr · decay^(depth − i)
    for (n, p) in model.named_parameters():
        layer = next(k for k in expected if n.startswith(k + "."))
        assert rate[id(p)] == pytest.approx(expected[layer]), n
        assert decay[id(p)] == (0.05 if p.ndim > 1 else 0.0), n
    assert len(rate) == len(list(model.parameters()))
    scheduler = build_scheduler(optimizer, 10, 3, 1, "cosine", 0.0)  # the schedule scales every layer alike
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    factors = {g["lr"] / g["initial_lr"] for g in optimizer.param_groups}
    assert len({round(f, 12) for f in factors}) == 1 and 0 < factors.pop() < 1
    plain = build_optimizer(model, name, lr=0.2, momentum=0.9, weight_decay=0.05)
    assert [(len(g["params"]), g["lr"], g["weight_decay"]) for g in plain.param_groups] == \
        [(len(param_groups(model, 0.05)[0]["params"]), 0.2, 0.05), (len(param_groups(model, 0.05)[1]["params"]), 0.2, 0.0)]


def test_optimizers_follow_the_params():
    model = tiny_model()
    sgd = build_optimizer(model, "sgd", lr=0.1, momentum=0.8, weight_decay=0.0)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(model, "adamw", lr=0.1, momentum=0.9, weight_decay=0.0)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.9, 0.999)
    with pytest.raises(MixerError):
        build_optimizer(model, "lion", lr=0.1, momentum=0.9, weight_decay=0.0)


def test_ema_update_matches_the_formula():
    model = tiny_model()
    ema = make_ema(model, 0.9)
    start = {k: v.clone() for (k, v) in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for (name, p) in ema.module.named_parameters():
        expected = 0.9 * (start[name] + 1) + 0.1 * (start[name] + 2)
        torch.testing.assert_close(p, expected)
    assert make_ema(model, 0.0) is None


@pytest.mark.parametrize(("text", "every"), [("500", Every(steps=500)), ("90s", Every(seconds=90.0)),
                                             ("10m", Every(seconds=600.0)), ("1.5h", Every(seconds=5400.0))])
def test_checkpoint_intervals(text, every):
    assert Every.parse(text) == every


@pytest.mark.parametrize("text", ["0", "-5", "10x", "1.5", "", "m"])
def test_bad_checkpoint_intervals(text):
    with pytest.raises(MixerError, match="--checkpoint-every must be"):
        Every.parse(text)


def test_time_based_checkpoints_happen_inside_epochs(tmp_path, monkeypatch):
    """The loop's timer reads a clock that only the steps move: 1 s a step, whatever the machine's speed."""
    now = [0.0]

    class Ticking(Record):
        def step(self, state):
            now[0] += 1.0
            super().step(state)

    monkeypatch.setattr(engine, "CheckpointTimer", lambda every, step: CheckpointTimer(every, step, lambda: now[0]))
    record = Ticking()
    run(tmp_path / "run", config(epochs=2), reporter=record, every=Every(seconds=2.5))
    # due 2.5 s after the last checkpoint: at step 3, then 9 (three steps after epoch 1's end at 6)
    assert record.checkpoints == [(0, 3, 3), (1, 0, 6), (1, 3, 9), (2, 0, 12)]


def test_checkpoint_file_holds_the_fingerprint_and_position(tmp_path):
    with pytest.raises(Crash):
        run(tmp_path / "run", reporter=Record(crash_at=10), every=Every(steps=3), fingerprint={"depth": 2})
    folder = only_run(tmp_path / "run")
    payload = train_state.read(folder)
    assert payload["fingerprint"] == {"depth": 2, "global_batch": 8}
    assert folder.name == train_state.run_key(payload["fingerprint"])
    assert json.loads((folder / "fingerprint.json").read_text()) == {"depth": 2, "global_batch": 8}
    assert payload["position"] == {"epoch": 1, "step_in_epoch": 3, "step": 9}
    assert [m["epoch"] for m in payload["history"]] == [1]


# ---- a linear probe (freeze: features) --------------------------------------------------------

def probe_run(folder, cache=True, cfg=None, reporter=None, calls=None):
    model = tiny_model(dropout=0.2, drop_path=0.2)  # the frozen layers must not apply them
    with torch.no_grad():
        model.head.weight.normal_(0, 0.1)
    before = {k: v.clone() for (k, v) in model.state_dict().items()}
    result = train(model, tiny_split(), tiny_split(12, seed=1), cfg or config(freeze="features"), PREP, folder,
                   {"run": "probe"}, Machine(cache_features=cache), None, reporter or Record())
    return result, before


def count_feature_passes(monkeypatch) -> list[int]:
    from mixer.model import MlpMixer

    calls, original = [], MlpMixer.forward_features
    monkeypatch.setattr(MlpMixer, "forward_features", lambda self, x: calls.append(len(x)) or original(self, x))
    return calls


def test_a_probe_computes_each_images_features_once_and_trains_the_same_head(tmp_path, monkeypatch):
    calls = count_feature_passes(monkeypatch)
    cached, before = probe_run(tmp_path / "cached")
    assert sum(calls) == 48 + 12  # each training and validation image once, for all 3 epochs
    calls.clear()
    every_step, _ = probe_run(tmp_path / "every-step", cache=False)
    assert sum(calls) == 3 * (48 + 12)  # the control: the frozen layers ran on every batch
    a, b = weights(cached), weights(every_step)
    assert max_difference(a, b) < 1e-5
    for (name, tensor) in before.items():
        if name.startswith("head."):
            assert (a[name] - tensor).abs().max() > 1e-3, name  # the head learned
        else:
            assert torch.equal(a[name], tensor), name  # the features are the checkpoint's
    assert cached.metrics["val/accuracy"] == every_step.metrics["val/accuracy"]
    assert abs(cached.metrics["train/loss"] - every_step.metrics["train/loss"]) < 1e-5


def test_a_probe_with_ema_delivers_the_whole_model_with_the_averaged_head(tmp_path):
    result, before = probe_run(tmp_path / "run", cfg=config(freeze="features", ema_decay=0.9))
    every_step, _ = probe_run(tmp_path / "control", cache=False, cfg=config(freeze="features", ema_decay=0.9))
    assert set(weights(result)) == set(before)
    assert max_difference(weights(result), weights(every_step)) < 1e-5
    best, control = (load_model(only_run(tmp_path / name) / "best").state_dict() for name in ("run", "control"))
    assert set(best) == set(before) and max_difference(best, control) < 1e-5  # the averaged head, as the control's


def test_a_probe_run_continues_after_a_crash(tmp_path):
    straight, _ = probe_run(tmp_path / "straight")
    with pytest.raises(Crash):
        probe_run(tmp_path / "part", reporter=Record(crash_at=8))
    again = Record()
    resumed, _ = probe_run(tmp_path / "part", reporter=again)
    assert again.steps == list(range(7, 19))  # the epoch-1 checkpoint at step 6: only the rest ran
    assert max_difference(weights(straight), weights(resumed)) == 0


def test_a_probe_with_augmentation_runs_the_frozen_layers_every_batch(tmp_path, monkeypatch):
    calls = count_feature_passes(monkeypatch)
    record = Record()
    result, before = probe_run(tmp_path / "run", cfg=config(freeze="features", augment=AugmentConfig(hflip=0.5)),
                               reporter=record)
    assert sum(calls) == 3 * (48 + 12)
    assert any("the frozen layers run on every batch" in n for n in record.notes)
    assert all(torch.equal(weights(result)[k], v) for (k, v) in before.items() if not k.startswith("head."))


def test_a_compiled_run_saves_and_continues_under_the_models_own_names(tmp_path):
    """torch.compile wraps the model (`_orig_mod.`): checkpoints and models must not carry the wrapper's names."""
    cfg = config(epochs=2, freeze="features")
    with pytest.raises(Crash):
        train(tiny_model(), tiny_split(), tiny_split(12, seed=1), cfg, PREP, tmp_path, {"run": "c"},
              Machine(compile=True), None, Record(crash_at=8))
    folder = only_run(tmp_path)
    assert set(train_state.read(folder)["model"]) == {"head.weight", "head.bias"}
    again = Record()
    result = train(tiny_model(), tiny_split(), tiny_split(12, seed=1), cfg, PREP, tmp_path, {"run": "c"},
                   Machine(compile=True), None, again)
    assert again.steps == list(range(7, 13)) and set(result.model.state_dict()) == set(tiny_model().state_dict())
    assert result.folder == folder and run_folders(tmp_path) == [folder]
    assert set(load_model(folder / "best").state_dict()) == set(tiny_model().state_dict())


def test_a_cached_probes_checkpoint_is_never_loaded_into_the_whole_model(tmp_path):
    """It holds only the head: a run that trains through the frozen layers is another run, in a folder of its
    own, starting anew with a note; the probe's state stays."""
    root = tmp_path / "run"
    with pytest.raises(Crash):
        probe_run(root, reporter=Record(crash_at=8))
    probe = only_run(root)
    kept = (probe / "last.pt").read_bytes()
    size = on_disk(probe)
    record = Record()
    (result, _) = probe_run(root, cache=False, reporter=record)
    (whole,) = (f for f in run_folders(root) if f != probe)
    assert result.folder == whole
    assert (f"starting a new run in {whole}; 1 other run(s) stay in {root} ({format_bytes(size)}) and continue when "
            f"their params come back; `rm -r {root}/<run>` frees one") in record.notes, record.notes
    assert "trains head → (none)" in train_state.differences(train_state.read(probe)["fingerprint"],
                                                             train_state.read(whole)["fingerprint"])
    assert record.steps[0] == 1 and (probe / "last.pt").read_bytes() == kept


def test_the_next_batch_is_gathered_while_the_loop_works_on_this_one():
    """Overlap without a clock: after handing over batch k, the reader starts gathering batch k+1 by itself
    (the test waits for that event before asking for it); the batches come in order, unchanged."""
    started = [threading.Event() for _ in range(4)]

    class Watched(Split):
        def gather(self, rows, pin=False):
            started[int(rows[0]) // 4].set()
            return super().gather(rows, pin)

    data = tiny_split(16)
    watched = Watched(data.images, data.labels, data.paths, data.classes)
    batches = [np.arange(k * 4, (k + 1) * 4) for k in range(4)]
    reader = engine.prefetched(watched, batches, "cpu")
    for k in range(4):
        images, labels = next(reader)
        expected = data.batch(batches[k], "cpu")
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
        if k + 1 < 4:  # a failsafe timeout: without a reader ahead the event never comes
            assert started[k + 1].wait(timeout=60), f"batch {k + 1} was not gathered while batch {k} was in use"
    assert next(reader, None) is None


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_delivers_the_best_val_epoch_or_the_last_and_says_which(tmp_path, keep):
    result = run(tmp_path / "run", config(epochs=4, lr=0.05, keep=keep))
    accuracies = [m["val/accuracy"] for m in result.state.history]
    epoch = accuracies.index(max(accuracies)) + 1 if keep == "best" else 4
    assert result.kept == {"keep": keep, "epoch": epoch, "of": 4, "val_accuracy": accuracies[epoch - 1]}
    assert result.folder == only_run(tmp_path / "run")
    best = load_model(result.folder / train_state.BEST).state_dict()
    last = torch.load(result.folder / train_state.LAST, weights_only=True)["model"]
    delivered = result.model.state_dict()
    same_as = {name: all(torch.equal(delivered[k], ref[k]) for k in delivered) for (name, ref) in
               (("best", best), ("last", last))}
    assert accuracies.index(max(accuracies)) + 1 < 4  # this run peaks early: best and last differ
    assert same_as[keep] and not same_as["last" if keep == "best" else "best"]


# ---- what the loop tells and hands over, read exactly (each fails on a one-token change of mixer/engine.py)

class Told(Record):
    """Records every call the loop makes to its reporter, with the arguments."""

    def __init__(self, stop_at=None, stop=None, watch=None):
        super().__init__(stop_at=stop_at, stop=stop)
        self.started, self.progressed, self.written, self.metrics, self.watch, self.flags = None, [], [], [], watch, []

    def start(self, state, epochs, steps_per_epoch):
        super().start(state, epochs, steps_per_epoch)
        self.started = (state.step, epochs, steps_per_epoch)

    def step(self, state):
        if self.watch is not None:
            self.flags.append(self.watch.grad_checkpointing)
        super().step(state)

    def progress(self, state, loss):
        self.progressed.append((state.step, loss))

    def checkpoint(self, state, path, size, seconds):
        super().checkpoint(state, path, size, seconds)
        self.written.append((path, size, path.stat().st_size, seconds))

    def epoch(self, metrics):
        super().epoch(metrics)
        self.metrics.append(metrics)


def ticking(monkeypatch, seconds=0.25):
    """The loop's clock (epoch timing only) moves `seconds` a call, whatever the machine's speed."""
    now = iter(np.arange(1, 10_000) * seconds)
    monkeypatch.setattr(engine, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: float(next(now)))}))


# 12 images, batch 1: 12 optimizer steps an epoch; the head starts at zero, so step 1's loss is exactly ln 3
CONTRACT = dict(epochs=2, batch_size=1, lr=1e-6, warmup_epochs=0, scheduler="linear", min_lr=5e-7,
                layer_decay=0.5)


def short_run(folder, cfg, machine=None, reporter=None, model=None):
    """12 training images and 6 to validate: at batch 1, 12 optimizer steps an epoch."""
    return train(model or tiny_model(), tiny_split(12), tiny_split(6, seed=1), cfg, PREP, folder, {"run": "short"},
                 machine or Machine(), None, reporter)


def contract_run(folder, reporter, stop):
    return short_run(folder, config(**CONTRACT), Machine(log_every=1, stop=stop), reporter)


def test_the_loop_reports_what_it_did_and_stops_where_asked(tmp_path, monkeypatch):
    """A stop asked at an epoch's last step ends that epoch and raises; one inside an epoch raises at that step;
    one at the run's very last step changes nothing. The reporter sees the run's size, each step's running loss,
    each checkpoint's file, and each epoch's metrics (speed by the loop's clock, counting only images this
    process trained)."""
    ticking(monkeypatch)
    root, stop = tmp_path / "run", threading.Event()
    first = Told(stop_at=12, stop=stop)
    with pytest.raises(Interrupted) as caught:
        contract_run(root, first, stop)
    folder = only_run(root)  # the run's own folder: last.pt and best/ are there
    assert (caught.value.state.epoch, caught.value.state.step, caught.value.path) == (1, 12, folder / train_state.LAST)
    assert first.started == (0, 2, 12)
    assert [s for (s, _) in first.progressed] == list(range(1, 12))  # every log_every=1 step but the epoch's last
    assert first.progressed[0][1] == pytest.approx(np.log(3), abs=1e-6)  # the mean of one loss, of zero logits
    assert all(abs(loss - np.log(3)) < 1e-3 for (_, loss) in first.progressed)  # means, at lr 1e-6 barely moving
    ((path, size, on_disk, seconds),) = first.written
    assert path == folder / train_state.LAST and size == on_disk and isinstance(seconds, float) and seconds >= 0
    (metrics,) = first.metrics
    assert set(metrics) == {"epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr",
                            "images_per_second"}
    assert metrics["train/loss"] == pytest.approx(np.log(3), abs=1e-3)
    assert metrics["train/accuracy"] in [k / 12 for k in range(13)] and metrics["train/accuracy"] > 0
    assert metrics["images_per_second"] == pytest.approx(12 / 0.25)  # one tick between the epoch's start and end
    # the head's rate (layer_decay scales the others down), halfway down the linear decay to min_lr
    assert metrics["lr"] == pytest.approx(5e-7 + 5e-7 * 0.5)
    scales = sorted({g["lr_scale"] for g in train_state.read(folder)["optimizer"]["param_groups"]})
    assert scales == [0.5 ** 3, 0.5 ** 2, 0.5, 1.0]  # depth 2: the stem, block 0, block 1, the head and norm
    assert read_config(folder / train_state.BEST)["kept"] == {"keep": "best", "epoch": 1}

    second = Told(stop_at=15, stop=stop)
    stop.clear()
    with pytest.raises(Interrupted) as caught:
        contract_run(root, second, stop)
    assert (caught.value.state.epoch, caught.value.state.step, caught.value.path) == (1, 15, folder / train_state.LAST)

    third = Told(stop_at=24, stop=stop)
    stop.clear()
    result = contract_run(root, third, stop)  # asked at the last step: there is nothing left to stop
    assert third.steps == list(range(16, 25)) and result.is_main_process is True and result.folder == folder
    (metrics,) = third.metrics
    assert metrics["images_per_second"] == pytest.approx(9 / 0.25)  # the 3 images trained before the stop excluded
    assert metrics["lr"] == pytest.approx(5e-7)  # the floor, at the end of the decay


def test_a_run_without_a_reporter_and_with_grad_checkpointing(tmp_path):
    cfg = config(epochs=1, batch_size=4)
    result = short_run(tmp_path / "quiet", cfg)
    assert len(result.state.history) == 1 and result.is_main_process
    for (on, folder) in ((True, "gc"), (False, "plain")):  # the control: the flag follows the machine setting
        watched = tiny_model()
        told = Told(watch=watched)
        short_run(tmp_path / folder, cfg, Machine(grad_checkpointing=on), told, model=watched)
        assert told.flags == [on] * 3


def diverging(monkeypatch):
    """Record each step's loss as the loop computes it: the first that is not finite is where it diverged."""
    losses, real = [], F.cross_entropy

    def recorded(*args, **kw):
        loss = real(*args, **kw)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(engine, "F", type("F", (), {"cross_entropy": staticmethod(recorded)}))
    return losses


@pytest.mark.parametrize("found_by", ["a log read", "a checkpoint"])
def test_divergence_names_the_epoch_the_step_and_the_loss(tmp_path, monkeypatch, found_by):
    losses = diverging(monkeypatch)
    machine = Machine(log_every=1) if found_by == "a log read" else Machine(log_every=10_000,
                                                                           checkpoint_every=Every(steps=1))
    cfg = config(epochs=2, batch_size=1, lr=1e30, clip_grad=0.0, optimizer="sgd", warmup_epochs=0)
    with pytest.raises(MixerError) as error:
        short_run(tmp_path, cfg, machine, Record())
    bad = next(k for (k, loss) in enumerate(losses, start=1) if not np.isfinite(loss))
    assert 1 < bad < 12  # inside the first epoch, so that it is found between steps
    assert str(error.value) == (f"training diverged at epoch 1, step {bad}: the loss is {losses[bad - 1]}; "
                                "lower lr (now 1e+30) or raise clip_grad")


def test_min_lr_may_reach_lr_but_not_pass_it():
    assert config(min_lr=3e-3).min_lr == 3e-3
    with pytest.raises(MixerError) as error:
        config(min_lr=4e-3)
    assert str(error.value) == "min_lr must be between 0 and lr (0.003), got 0.004"


def test_the_accelerator_is_data_parallel_on_a_cpu_and_agrees_with_the_launcher(monkeypatch):
    """Without cpu=True on a machine without CUDA, ranks launched together would each train alone."""
    import accelerate

    made = []

    class Seen:
        num_processes, process_index = 1, 0

        def __init__(self, **kw):
            made.append(kw)

    monkeypatch.setattr(accelerate, "Accelerator", Seen)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    engine.make_accelerator(3, Machine(mixed_precision="bf16"))
    assert made == [{"cpu": not torch.cuda.is_available(), "mixed_precision": "bf16",
                     "gradient_accumulation_steps": 3}]
    for (name, value) in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                          ("MASTER_PORT", "29500")):  # a launcher's second process
        monkeypatch.setenv(name, value)
    with pytest.raises(MixerError) as error:
        engine.make_accelerator(1, Machine())
    assert str(error.value) == ("launched as process 1 of 2 but accelerate sees process 0 of 1: the ranks would "
                                "train independently; launch with torchrun or `accelerate launch --multi_gpu`")
    Seen.num_processes = 2  # the same world, another rank: still not the launcher's process
    with pytest.raises(MixerError) as error:
        engine.make_accelerator(1, Machine())
    assert str(error.value).startswith("launched as process 1 of 2 but accelerate sees process 0 of 2: ")
    Seen.process_index = 1  # the control: what the launcher said
    assert isinstance(engine.make_accelerator(1, Machine()), Seen)


def test_no_batches_gathers_nothing():
    assert list(engine.prefetched(tiny_split(4), [], "cpu")) == []


def test_a_probe_with_augmentation_says_what_it_costs(tmp_path):
    record = Record()
    probe_run(tmp_path / "run", cfg=config(freeze="features", epochs=1, augment=AugmentConfig(hflip=0.5)),
              reporter=record)
    assert ("freeze: features with augmentation: the frozen layers run on every batch (without augmentation each "
            "image's features are computed once)") in record.notes


@pytest.mark.parametrize("best_dir", ["absent", "without kept", "of epoch 1"])
def test_keep_best_delivers_best_only_when_its_config_names_another_epoch(tmp_path, best_dir):
    """A run folder from before `keep` (no best/, or a best/ whose config.json does not say its epoch) delivers
    the last weights; a best/ of an earlier epoch is loaded."""
    last, earlier = tiny_model(), tiny_model(classes=3, dropout=0.0)
    with torch.no_grad():
        earlier.head.bias.fill_(0.25)
    if best_dir != "absent":
        save_model(earlier, tmp_path / train_state.BEST, kept={"keep": "best", "epoch": 1} if best_dir == "of epoch 1"
                   else None)
    state = train_state.TrainState(fingerprint={}, epoch=2, history=[{"val/accuracy": 0.75}, {"val/accuracy": 0.5}])
    model, kept = engine._kept(last, config(keep="best"), tmp_path, state, True)
    epoch = 1 if best_dir == "of epoch 1" else 2
    assert kept == {"keep": "best", "epoch": epoch, "of": 2, "val_accuracy": [0.75, 0.5][epoch - 1]}
    assert torch.equal(model.head.bias, earlier.head.bias if epoch == 1 else last.head.bias)


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_clipping_is_of_the_accumulated_gradient_and_zero_turns_it_off(tmp_path, clip):
    base = dict(lr=0.05, optimizer="sgd", warmup_epochs=0, clip_grad=clip, epochs=1)
    big = run(tmp_path / "16", config(batch_size=16, **base))
    small = run(tmp_path / "8x2", config(batch_size=8, grad_accum=2, **base))
    assert max_difference(weights(big), weights(small)) <= 1e-5
    never = run(tmp_path / "never", config(batch_size=16, **{**base, "clip_grad": 1e9}))  # no norm is that large
    assert (max_difference(weights(big), weights(never)) == 0) == (clip == 0)


@pytest.mark.parametrize(("key", "value"), [("label_smoothing", 0.2), ("ema_decay", 0.5)])
def test_smoothing_and_the_ema_reach_the_weights(tmp_path, key, value):
    plain = run(tmp_path / "plain", config(epochs=1))
    changed = run(tmp_path / key, config(epochs=1, **{key: value}))
    assert max_difference(weights(plain), weights(changed)) > 1e-4
    if key == "ema_decay":  # the delivered weights are the average; the checkpoint holds the raw ones beside it
        payload = train_state.read(only_run(tmp_path / key))
        assert payload["ema"] is not None
        assert max(float((payload["model"][k] - v).abs().max()) for (k, v) in weights(changed).items()) > 1e-4


def test_the_running_loss_is_read_every_log_every_steps(tmp_path):
    told = Told()
    short_run(tmp_path, config(epochs=1, batch_size=1), Machine(log_every=4), told)
    assert [step for (step, _) in told.progressed] == [4, 8]  # not 12: the epoch's end reads the sums anyway
