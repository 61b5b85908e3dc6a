"""The resumable state of a training run: `last.pt` in the run's checkpoint folder, when it is
written (`Every`, `CheckpointTimer`) and whether a run continues from it (`start_or_continue`).

Each run has a folder of its own, named by its fingerprint, under the folder of its output
(checkpoints/<output_dir>/<key>/): a run with other params never overwrites another's state, so an
interrupted run continues when its params come back, whatever ran in between. Every run's folder
stays until the user removes it; a new run says how many others are kept and how much disk they take.

One file holds everything a run needs to continue exactly: weights, optimizer, schedule and EMA,
the position (epoch and optimizer step within it), the per-epoch history and the running sums of
the epoch in progress. No random state: the loop draws every batch's randomness from its position.
Each checkpoint records the run's fingerprint (what decides its result); a checkpoint of another
run is never loaded. Files are written to a temporary name and renamed, and read back with
`torch.load(weights_only=True)`, so nothing is ever unpickled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixer.errors import MixerError
from mixer.files import atomic_write
from mixer.resources import format_bytes

LAST = "last.pt"
BEST = "best"  # a model directory: the weights of the epoch with the best val accuracy
RUN_RECORD = "fingerprint.json"  # what decides the run's result (its params, data and starting weights)
FORMAT = 3


@dataclass(frozen=True)
class Every:
    """A checkpoint interval: a number of optimizer steps or of seconds."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Every":
        """'500' (optimizer steps), '90s', '10m' or '2h'."""
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
        if m is None or float(m.group(1)) <= 0 or (not m.group(2) and "." in m.group(1)):
            raise MixerError(f"--checkpoint-every must be a number of steps (500) or a time (90s, 10m, 2h), "
                             f"got {text!r}")
        if not m.group(2):
            return cls(steps=int(m.group(1)))
        return cls(seconds=float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)])


@dataclass
class RunningSums:
    """Sums over the images trained on so far in the epoch in progress (all processes')."""

    loss: float = 0.0
    correct: float = 0.0
    images: float = 0.0


@dataclass
class TrainState:
    """Where a run stands, besides the tensors."""

    fingerprint: dict
    epoch: int = 0               # epochs completed
    step_in_epoch: int = 0       # optimizer steps done in the epoch in progress
    step: int = 0                # optimizer steps done in all
    best_accuracy: float = -1.0
    history: list[dict] = field(default_factory=list)  # one row of metrics per completed epoch
    sums: RunningSums = field(default_factory=lambda: RunningSums())  # the epoch in progress, so far


def differences(saved: dict, wanted: dict) -> list[str]:
    """`key old → new` for every key on which two fingerprints differ."""
    keys = sorted(set(saved) | set(wanted))
    return [f"{k} {_short(saved.get(k))} → {_short(wanted.get(k))}" for k in keys if saved.get(k) != wanted.get(k)]


def _short(value) -> str:
    text = "(none)" if value is None else str(value)
    return text if len(text) <= 20 else text[:12] + "…"


def save(directory: Path, state: TrainState, model, optimizer, scheduler, ema) -> tuple[Path, int, float]:
    """Write `last.pt` atomically; returns its path, size in bytes and seconds taken."""
    started = time.perf_counter()
    payload = {
        "format": FORMAT,
        "fingerprint": state.fingerprint,
        "position": {"epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "step": state.step},
        "best_accuracy": state.best_accuracy,
        "history": state.history,
        "sums": asdict(state.sums),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
    }
    path = Path(directory) / LAST
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path, path.stat().st_size, time.perf_counter() - started


class OtherVersion(MixerError):
    """A checkpoint file of another format: another version of mixer wrote it."""


def read(directory: Path) -> dict | None:
    """The payload of `last.pt`, or None if there is none; a file that is not one is an error."""
    path = Path(directory) / LAST
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise MixerError(f"{path} is not a readable checkpoint ({type(exc).__name__}); delete it, or train "
                         "with --no-resume to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise OtherVersion(f"{path} is not a checkpoint of this version of mixer; delete it, or train with "
                           "--no-resume to start over")
    return payload


def restore(payload: dict, path: Path, model, optimizer, scheduler, ema) -> TrainState:
    """Load a payload read by `read` into the run's objects (whose fingerprint it matches)."""
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if ema is not None:
            ema.load_state_dict(payload["ema"])
        position = payload["position"]
        return TrainState(payload["fingerprint"], position["epoch"], position["step_in_epoch"], position["step"],
                          payload["best_accuracy"], payload["history"], RunningSums(**payload["sums"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise MixerError(f"{path} does not fit this run ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "delete it, or train with --no-resume to start over") from None


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete what an interrupted write left behind (`.last.pt.*.tmp` and the like)."""
    leftovers = sorted(Path(directory).glob(".*.tmp")) + sorted(Path(directory, BEST).glob(".*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


KEY_GLOB = "[0-9a-f]" * 12  # a run folder's name: the start of its fingerprint's sha256 (outputs.RUN says so too)
KEY = re.compile(fnmatch.translate(KEY_GLOB))  # the same rule, for fullmatch


def run_key(fingerprint: dict) -> str:
    """The name of a run's folder: the same for the same fingerprint on every machine and process."""
    text = json.dumps(fingerprint, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_folder(root: Path, fingerprint: dict) -> Path:
    """root/<key>: the folder of the run with this fingerprint, in the folder of its output (`root`)."""
    return Path(root) / run_key(fingerprint)


def other_runs(root: Path, folder: Path) -> list[Path]:
    """The folders under `root` of other runs with a checkpoint to continue (one stopped before its first
    checkpoint has nothing to keep)."""
    try:
        return sorted(p for p in Path(root).iterdir() if KEY.fullmatch(p.name) and p != Path(folder)
                      and (p / LAST).is_file())
    except OSError:
        return []


def disk_bytes(folders: list[Path]) -> int:
    """Bytes the files under `folders` take."""
    total = 0
    for folder in folders:
        for (parent, _, files) in os.walk(folder):
            total += sum(os.lstat(os.path.join(parent, f)).st_size for f in files)
    return total


def adopt_legacy(root: Path, note: Callable[[str], None]) -> None:
    """A checkpoint of the layout before per-run folders (root/last.pt, root/best/): moved into its run's
    folder, so it continues when its params come back, as any run does. The main process calls it
    before any process reads its state, so it never raises (the others would wait for it): one it cannot
    read, or of another version of mixer, is no run's state and stays where it is, with a note."""
    root = Path(root)
    try:
        remove_temporaries(root)  # what a write killed in that layout left
        payload = read(root)
    except (MixerError, OSError) as exc:
        reason = "of another version of mixer" if isinstance(exc, OtherVersion) else "not readable"
        note(f"{root / LAST} is {reason}: left as it is (delete it to free its space)")
        return
    if payload is None or not isinstance(payload.get("fingerprint"), dict):
        return
    folder = run_folder(root, payload["fingerprint"])
    if (folder / LAST).exists():  # both layouts hold this run: the run folder's is the later one
        note(f"{root / LAST} is an older checkpoint of the run in {folder}: left as it is (delete it to free its space)")
        return
    try:
        folder.mkdir(exist_ok=True)
        for name in (BEST, LAST):  # best/ first: a kill between the two leaves last.pt where it is read again
            if os.path.lexists(root / name) and not os.path.lexists(folder / name):
                shutil.move(str(root / name), str(folder / name))
    except OSError as exc:
        note(f"{root / LAST} could not be moved into {folder} ({exc.strerror}): left as it is")


def start_or_continue(root: Path, fingerprint: dict, resume: bool | None, epochs: int, main: bool, model,
                      optimizer, scheduler, ema, note: Callable[[str], None]) -> tuple[TrainState, Path]:
    """The state to start from, and the run's folder under `root`: this run's checkpoint, or a fresh state
    (see `train`). Other runs' folders are never touched."""
    folder = run_folder(root, fingerprint)
    path = folder / LAST
    if main and folder.is_dir():
        remove_temporaries(folder)
    others = other_runs(root, folder)
    try:
        payload = read(folder) if resume is not False else None
    except OtherVersion:
        if resume:
            raise
        note(f"starting a new run: {path} is of another version of mixer; it is replaced at this run's first "
             "checkpoint")
        return TrainState(fingerprint), folder
    if payload is not None and differences(payload["fingerprint"], fingerprint):  # a hash collision, in theory
        raise MixerError(f"{path} holds another run than its folder's name says; delete {folder}")
    if payload is None:
        if resume and others:
            closest = min((read_fingerprint(o) for o in others), key=lambda f: len(differences(f, fingerprint)))
            said = "; ".join(differences(closest, fingerprint)[:6]) if closest else "unreadable"
            raise MixerError(f"cannot resume: {root} holds no checkpoint of this run, only of {len(others)} other "
                             f"run(s) (the closest: {said}); train without --resume to start this one")
        if resume:
            note(f"no checkpoint at {path}: starting from scratch")
        if main:  # the run's params, readable without torch, beside its checkpoint
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / RUN_RECORD, json.dumps(fingerprint, indent=1, sort_keys=True, default=str) + "\n")
        if others and main:
            note(f"starting a new run in {folder}; {len(others)} other run(s) stay in {root} "
                 f"({format_bytes(disk_bytes(others))}) and continue when their params come back; "
                 f"`rm -r {root}/<run>` frees one")
        return TrainState(fingerprint), folder
    state = restore(payload, path, model, optimizer, scheduler, ema)
    note(f"continuing from {path}: epoch {state.epoch + 1}, step {state.step}" if state.epoch < epochs
         else f"{path} holds this run, complete: writing its model")
    return state, folder


def read_fingerprint(folder: Path) -> dict:
    """The fingerprint a run folder records: its fingerprint.json (a few hundred bytes, not the checkpoint's
    weights), else its checkpoint's; {} when neither can be read."""
    try:
        recorded = json.loads((Path(folder) / RUN_RECORD).read_text(encoding="utf-8"))
        if isinstance(recorded, dict):
            return recorded
    except (OSError, ValueError):
        pass
    try:
        payload = read(folder)
    except MixerError:
        return {}
    return payload.get("fingerprint", {}) if payload else {}


class CheckpointTimer:
    """Says when a mid-epoch checkpoint is due: every N optimizer steps or T seconds of `clock`
    (time.monotonic unless given: tests pass a clock of their own)."""

    def __init__(self, every: Every | None, step: int, clock: Callable[[], float] | None = None):
        self.every, self.clock = every, clock or time.monotonic
        self.restart(step)

    def restart(self, step: int) -> None:
        self.step, self.time = step, self.clock()

    def due(self, step: int) -> bool:
        if self.every is None:
            return False
        if self.every.steps is not None:
            return step - self.step >= self.every.steps
        return self.clock() - self.time >= self.every.seconds
