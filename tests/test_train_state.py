"""The resume path's pieces on their own: the checkpoint file, the decision to continue, the timer."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from mixer import train_state
from mixer.errors import MixerError
from mixer.schedule import build_scheduler
from mixer.resources import format_bytes
from mixer.train_state import CheckpointTimer, Every, TrainState, differences, run_key, start_or_continue

AGAIN = "delete it, or train with --no-resume to start over"


def objects(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, build_scheduler(optimizer, 4, 3, 1, "cosine", 0.0)


def saved(folder, fingerprint: dict, epoch: int = 1, step: int = 6):
    state = TrainState(fingerprint, epoch=epoch, step=step, best_accuracy=0.5, history=[{"epoch": 1}])
    return train_state.save(folder, state, *objects(), None)


def test_differences_name_every_key_either_side_has():
    assert differences({"lr": 0.1, "seed": 0, "old": 1}, {"lr": 0.2, "seed": 0, "new": "x"}) == [
        "lr 0.1 → 0.2", "new (none) → x", "old 1 → (none)"]


def test_long_values_are_cut_after_20_characters():
    assert differences({"h": "a" * 20}, {"h": "b" * 21}) == [f"h {'a' * 20} → {'b' * 12}…"]


def test_save_says_where_how_big_and_how_long(tmp_path, monkeypatch):
    readings = iter([10.0, 12.5])  # save's clock, read before and after writing: no real time measured
    monkeypatch.setattr(train_state, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    path, size, seconds = saved(tmp_path, {"run": 1})
    assert path == tmp_path / "last.pt" and size == path.stat().st_size > 0 and seconds == 2.5


def test_read_refuses_what_is_not_a_checkpoint_of_this_version(tmp_path):
    path = tmp_path / "last.pt"
    assert train_state.read(tmp_path) is None
    torch.save([1, 2], path)
    with pytest.raises(MixerError) as caught:
        train_state.read(tmp_path)
    assert str(caught.value) == f"{path} is not a checkpoint of this version of mixer; {AGAIN}"
    torch.save({"format": train_state.FORMAT - 1}, path)
    with pytest.raises(MixerError, match="is not a checkpoint of this version of mixer"):
        train_state.read(tmp_path)
    path.write_bytes(pickle.dumps({"format": train_state.FORMAT, "code": pickle.Pickler}))  # unpickling runs code
    with pytest.raises(MixerError) as caught:
        train_state.read(tmp_path)
    assert str(caught.value) == f"{path} is not a readable checkpoint (UnpicklingError); {AGAIN}"


def test_restore_gives_the_saved_position_and_refuses_what_does_not_fit(tmp_path):
    path, _, _ = saved(tmp_path, {"run": 1}, epoch=2, step=9)
    state = train_state.restore(train_state.read(tmp_path), path, *objects(1), None)
    assert (state.fingerprint, state.epoch, state.step, state.best_accuracy) == ({"run": 1}, 2, 9, 0.5)
    wider = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(wider.parameters(), lr=0.1)
    with pytest.raises(MixerError) as caught:
        train_state.restore(train_state.read(tmp_path), path, wider, optimizer,
                            build_scheduler(optimizer, 4, 3, 1, "cosine", 0.0), None)
    assert str(caught.value).startswith(f"{path} does not fit this run (RuntimeError: Error(s) in loading "
                                        "state_dict for Linear:); ")
    assert str(caught.value).endswith(AGAIN)


def test_leftovers_of_interrupted_writes_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "best").mkdir()
    leftovers = [tmp_path / ".last.pt.abc.tmp", tmp_path / "best" / ".model.safetensors.x.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / "best" / "model.safetensors", tmp_path / "notes.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"")
    assert train_state.remove_temporaries(tmp_path) == leftovers
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)


def test_start_or_continue_keeps_each_run_in_a_folder_of_its_own(tmp_path):
    notes: list[str] = []
    a, b = {"lr": 0.1, "seed": 0}, {"lr": 0.2, "seed": 1}
    folder_a, folder_b = tmp_path / run_key(a), tmp_path / run_key(b)

    def start(fingerprint, resume, epochs=3):
        return start_or_continue(tmp_path, fingerprint, resume, epochs, True, *objects(), None, notes.append)

    (state, folder) = start(a, True)
    assert (state.fingerprint, folder) == (a, folder_a)
    assert notes.pop() == f"no checkpoint at {folder_a / 'last.pt'}: starting from scratch"
    assert json.loads((folder_a / "fingerprint.json").read_text()) == a  # readable without torch
    saved(folder_a, a)
    with pytest.raises(MixerError) as caught:
        start(b, True)
    assert str(caught.value) == (f"cannot resume: {tmp_path} holds no checkpoint of this run, only of 1 other run(s) "
                                 "(the closest: lr 0.1 → 0.2; seed 0 → 1); train without --resume to start this one")
    (state, folder) = start(b, None)
    assert (state.fingerprint, state.step, folder) == (b, 0, folder_b)
    size = train_state.disk_bytes([folder_a])
    assert notes.pop() == (f"starting a new run in {folder_b}; 1 other run(s) stay in {tmp_path} "
                           f"({format_bytes(size)}) and continue when their params come back; "
                           f"`rm -r {tmp_path}/<run>` frees one")
    saved(folder_b, b, epoch=2, step=9)  # the second run checkpoints: the first's state is untouched
    (state, folder) = start(a, None)
    assert (state.epoch, state.step, folder) == (1, 6, folder_a)
    assert notes.pop() == f"continuing from {folder_a / 'last.pt'}: epoch 2, step 6"
    assert start(b, None)[0].step == 9
    notes.pop()
    start(a, None, epochs=1)
    assert notes.pop() == f"{folder_a / 'last.pt'} holds this run, complete: writing its model"
    assert start(a, False)[0].step == 0 and notes.pop().startswith(f"starting a new run in {folder_a}; 1 other")


def test_a_checkpoint_of_the_layout_before_run_folders_moves_into_its_runs_folder(tmp_path):
    a = {"lr": 0.1, "seed": 0}
    saved(tmp_path, a)  # checkpoints/<output_dir>/last.pt, as versions before run folders wrote it
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "config.json").write_text("{}")
    notes: list[str] = []
    train_state.adopt_legacy(tmp_path, notes.append)
    (state, folder) = start_or_continue(tmp_path, {"lr": 0.2}, None, 3, True, *objects(), None, notes.append)
    assert state.step == 0 and folder == tmp_path / run_key({"lr": 0.2})
    assert not (tmp_path / "last.pt").exists()
    assert (tmp_path / run_key(a) / "last.pt").is_file() and (tmp_path / run_key(a) / "best" / "config.json").is_file()
    (state, folder) = start_or_continue(tmp_path, a, None, 3, True, *objects(), None, notes.append)
    assert (state.step, folder) == (6, tmp_path / run_key(a))


def test_run_keys_are_the_same_for_the_same_fingerprint_and_differ_otherwise():
    assert run_key({"lr": 0.1, "depth": 4}) == run_key({"depth": 4, "lr": 0.1})
    assert len({run_key({"lr": 0.1}), run_key({"lr": 0.2}), run_key({"lr": 0.1, "depth": 4})}) == 3
    assert train_state.KEY.fullmatch(run_key({"image_shape": [8, 8]}))


def test_a_same_run_checkpoint_that_does_not_fit_names_its_path(tmp_path):
    saved(tmp_path / run_key({"run": 1}), {"run": 1})
    wider = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(wider.parameters(), lr=0.1)
    with pytest.raises(MixerError, match=f"^{tmp_path / run_key({'run': 1}) / 'last.pt'} does not fit this run"):
        start_or_continue(tmp_path, {"run": 1}, None, 3, True, wider, optimizer,
                          build_scheduler(optimizer, 4, 3, 1, "cosine", 0.0), None, lambda _: None)


def test_fractions_of_a_unit_and_a_single_step_are_intervals():
    assert Every.parse("0.5m") == Every(seconds=30.0) and Every.parse("1") == Every(steps=1)


def test_the_timer_is_due_at_the_interval_not_before():
    now = [100.0]
    assert not CheckpointTimer(None, 0, clock=lambda: now[0]).due(10**6)
    timer = CheckpointTimer(Every(seconds=5.0), 0, clock=lambda: now[0])  # an injected clock: no real time
    now[0] = 104.9
    assert not timer.due(1)
    now[0] = 105.0
    assert timer.due(1)
    timer.restart(1)
    assert not timer.due(2)
    steps = CheckpointTimer(Every(steps=3), 4)
    assert [steps.due(s) for s in (5, 6, 7)] == [False, False, True]


def test_a_checkpoint_of_another_version_starts_a_new_run_unless_resume_is_asked(tmp_path):
    """After an upgrade, `dvc repro` (resume unset) starts over with a note; --resume says why it cannot."""
    torch.save({"format": train_state.FORMAT - 1}, tmp_path / "last.pt")  # the layout before run folders
    notes = []
    train_state.adopt_legacy(tmp_path, notes.append)  # never raises: the other processes wait for it
    assert notes.pop() == (f"{tmp_path / 'last.pt'} is of another version of mixer: left as it is (delete it to "
                           "free its space)")
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    train_state.adopt_legacy(tmp_path, notes.append)
    assert notes.pop() == f"{tmp_path / 'last.pt'} is not readable: left as it is (delete it to free its space)"
    assert (tmp_path / "last.pt").read_bytes() == b"not a checkpoint" and not notes
    folder = tmp_path / run_key({"run": 1})  # and in a run's own folder
    folder.mkdir()
    torch.save({"format": train_state.FORMAT - 1}, folder / "last.pt")
    (state, _) = train_state.start_or_continue(tmp_path, {"run": 1}, None, 3, True, *objects(1), None, notes.append)
    assert (state.epoch, state.step, state.fingerprint) == (0, 0, {"run": 1})
    assert notes[-1] == (f"starting a new run: {folder / 'last.pt'} is of another version of mixer; it is replaced "
                         "at this run's first checkpoint")
    with pytest.raises(MixerError, match="is not a checkpoint of this version of mixer"):
        train_state.start_or_continue(tmp_path, {"run": 1}, True, 3, True, *objects(1), None, notes.append)
    assert (tmp_path / "last.pt").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_no_other_run(tmp_path):
    notes: list[str] = []
    start_or_continue(tmp_path, {"lr": 0.1}, None, 3, True, *objects(), None, notes.append)  # fingerprint.json only
    saved(tmp_path / run_key({"lr": 0.3}), {"lr": 0.3})  # one with a checkpoint: the only one named
    (tmp_path / run_key({"lr": 0.3}) / "fingerprint.json").write_text(json.dumps({"lr": 0.3}))
    with pytest.raises(MixerError, match="holds no checkpoint of this run, only of 1 other run.s. .the closest: lr 0.3"):
        start_or_continue(tmp_path, {"lr": 0.2}, True, 3, True, *objects(), None, notes.append)
    assert not (tmp_path / run_key({"lr": 0.2})).exists()  # a refused --resume leaves no folder behind
    assert train_state.other_runs(tmp_path, tmp_path / run_key({"lr": 0.2})) == [tmp_path / run_key({"lr": 0.3})]
    (tmp_path / run_key({"lr": 0.3}) / "fingerprint.json").unlink()  # the checkpoint's record, when json is gone
    assert train_state.read_fingerprint(tmp_path / run_key({"lr": 0.3})) == {"lr": 0.3}


def test_adopting_the_old_layout_clears_its_leftovers_and_keeps_a_later_run_folder(tmp_path):
    (tmp_path / ".last.pt.abc.tmp").write_bytes(b"half")
    notes: list[str] = []
    saved(tmp_path, {"lr": 0.1}, step=6)
    saved(tmp_path / run_key({"lr": 0.1}), {"lr": 0.1}, step=9)  # the same run, later, in its own folder
    train_state.adopt_legacy(tmp_path, notes.append)
    assert not (tmp_path / ".last.pt.abc.tmp").exists()
    assert notes == [f"{tmp_path / 'last.pt'} is an older checkpoint of the run in {tmp_path / run_key({'lr': 0.1})}: "
                     "left as it is (delete it to free its space)"]
    assert train_state.read(tmp_path / run_key({"lr": 0.1}))["position"]["step"] == 9
