"""What `mixer train` shows: a rich bar (epoch, loss, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

from mixer.engine import Reporter
from mixer.text import shown
from mixer.train_state import TrainState


class ConsoleReporter(Reporter):
    """One line per epoch, checkpoint and note; a progress bar too when `bar` (default: on a terminal)."""

    MEASURE = 20  # optimizer steps the first estimate of the run's time is measured on (or one epoch, if fewer)

    def __init__(self, bar: bool | None = None, clock: Callable[[], float] = time.monotonic):
        self.use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar = None
        self.clock = clock
        self.total, self.per_epoch, self.since, self.estimated = 0, 1, None, False

    def start(self, state: TrainState, epochs: int, steps_per_epoch: int) -> None:
        self.total, self.per_epoch = epochs * steps_per_epoch, steps_per_epoch
        if not self.use_bar:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=epochs * steps_per_epoch, completed=state.step,
                                      epoch=state.epoch + 1, loss=math.nan)
        self.bar.start()

    def step(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.step, epoch=state.epoch + 1)
        if self.since is None:  # from the end of the first step: its warm-up (allocations, compile) is not the rate
            self.since = (self.clock(), state.step)
        elif not self.estimated and state.step - self.since[1] >= max(1, min(self.MEASURE, self.per_epoch - 1)):
            self.estimated = True
            (t0, s0) = self.since
            per_step = (self.clock() - t0) / (state.step - s0)
            self.line(f"estimate: about {duration(per_step * (self.total - state.step))} to go, "
                      f"{duration(per_step * self.per_epoch)} an epoch (measured on steps {s0 + 1}-{state.step}, "
                      "training only: validation adds to it)")

    def left(self, step: int) -> str:
        """The time left at optimizer step `step`, at the rate measured since the first step ('' before)."""
        if self.since is None or step <= self.since[1] or step >= self.total:
            return ""
        (t0, s0) = self.since
        return duration((self.clock() - t0) / (step - s0) * max(self.total - step, 0))

    def progress(self, state: TrainState, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, loss=loss)

    def epoch(self, m: dict) -> None:
        left = self.left(m["epoch"] * self.per_epoch)
        self.line(f"epoch {m['epoch']}: train loss {m['train/loss']:.4f} acc {m['train/accuracy']:.4f} | "
                  f"val loss {m['val/loss']:.4f} acc {m['val/accuracy']:.4f} | lr {m['lr']:.2e} | "
                  f"{rate(m['images_per_second'])} img/s" + (f" | {left} left" if left else ""))

    def checkpoint(self, state: TrainState, path: Path, size: int, seconds: float) -> None:
        where = f"end of epoch {state.epoch}" if state.step_in_epoch == 0 else f"epoch {state.epoch + 1}"
        self.line(f"checkpoint: step {state.step} ({where}) -> {path} ({size / 2**20:.1f} MiB, {seconds:.2f} s)")

    def note(self, text: str) -> None:
        self.line(f"note: {text}")

    def line(self, text: str) -> None:
        text = shown(text)  # notes and checkpoint paths name things from outside (output_dir, a checkpoint)
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def rate(per_second: float) -> str:
    """Images a second, to three figures however slow (a big model on a CPU makes fewer than one)."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


def duration(seconds: float) -> str:
    """12 s, 4.5 min, 2.3 h: what a person reads."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"
