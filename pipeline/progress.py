"""What `mixer train` shows: a rich bar (epoch, loss, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from mixer.engine import Reporter
from mixer.text import shown
from mixer.train_state import TrainState


class ConsoleReporter(Reporter):
    """One line per epoch, checkpoint and note; a progress bar too when `bar` (default: on a terminal)."""

    def __init__(self, bar: bool | None = None):
        self.use_bar = sys.stdout.isatty() if bar is None else bar
        self.bar = None

    def start(self, state: TrainState, epochs: int, steps_per_epoch: int) -> None:
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

    def progress(self, state: TrainState, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, loss=loss)

    def epoch(self, m: dict) -> None:
        self.line(f"epoch {m['epoch']}: train loss {m['train/loss']:.4f} acc {m['train/accuracy']:.4f} | "
                  f"val loss {m['val/loss']:.4f} acc {m['val/accuracy']:.4f} | lr {m['lr']:.2e} | "
                  f"{m['images_per_second']:.0f} img/s")

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
