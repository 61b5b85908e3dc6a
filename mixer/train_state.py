"""The resumable state of a training run: `last.pt` in the run's checkpoint folder, when it is
written (`Every`, `CheckpointTimer`) and whether a run continues from it (`start_or_continue`).

One file holds everything a run needs to continue exactly: weights, optimizer, schedule and EMA,
the position (epoch and optimizer step within it), the per-epoch history and the running sums of
the epoch in progress. No random state: the loop draws every batch's randomness from its position.
Each checkpoint records the run's fingerprint (what decides its result); a checkpoint of another
run is never loaded. Files are written to a temporary name and renamed, and read back with
`torch.load(weights_only=True)`, so nothing is ever unpickled.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mixer.errors import MixerError
from mixer.files import atomic_write

LAST = "last.pt"
BEST = "best"  # a model directory: the weights of the epoch with the best val accuracy
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


def start_or_continue(run_dir: Path, fingerprint: dict, resume: bool | None, epochs: int, main: bool, model,
                      optimizer, scheduler, ema, note: Callable[[str], None]) -> TrainState:
    """The state to start from: this run's checkpoint in `run_dir`, or a fresh one (see `train`)."""
    path = run_dir / LAST
    if main:
        remove_temporaries(run_dir)
    try:
        payload = read(run_dir) if resume is not False else None
    except OtherVersion:
        if resume:
            raise
        note(f"starting a new run: {path} is of another version of mixer; it stays until this run writes its "
             "first checkpoint")
        return TrainState(fingerprint)
    if payload is None:
        if resume:
            note(f"no checkpoint at {path}: starting from scratch")
        return TrainState(fingerprint)
    changed = differences(payload["fingerprint"], fingerprint)
    if changed and resume:
        raise MixerError(f"cannot resume: {path} is of another run ({'; '.join(changed)}); train without "
                         "--resume to start a new run")
    if changed:
        note(f"starting a new run: {path} is of another run ({'; '.join(changed)}); it stays until this "
             "run writes its first checkpoint")
        return TrainState(fingerprint)
    state = restore(payload, path, model, optimizer, scheduler, ema)
    note(f"continuing from {path}: epoch {state.epoch + 1}, step {state.step}" if state.epoch < epochs
         else f"{path} holds this run, complete: writing its model")
    return state


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
