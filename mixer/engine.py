"""The training loop on HF Accelerate: one CPU, GPUs, or several processes, the same code.

`train` is the loop, in the order accelerate's examples use: prepare, forward, backward, clip,
step, schedule, log. Batching, evaluation, checkpoints and logging are small functions below it.

Reproducibility: every epoch reseeds its shuffling, augmentation and dropout from (seed, epoch),
so resuming from the checkpoint written at the end of an epoch replays the rest of the run exactly.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mixer.augment import AugmentConfig, augment
from mixer.checkpoint import atomic_write, save_model
from mixer.data import Split
from mixer.errors import MixerError
from mixer.model import MlpMixer
from mixer.schedule import build_scheduler

MEAN, STD = 0.5, 0.5  # inputs scaled to [-1, 1], as the paper's and timm's Mixer weights expect
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of a run (machine settings such as precision live in `Machine`)."""

    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 10
    scheduler: str = "cosine"
    min_lr: float = 0.0
    clip_grad: float = 1.0
    label_smoothing: float = 0.0
    grad_accum: int = 1
    ema_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 256
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class Machine:
    """Where and how fast a run goes; never changes its result (beyond float rounding)."""

    mixed_precision: str = "no"
    compile: bool = False
    progress: bool | None = None  # None: a bar on a terminal, plain lines otherwise


def make_accelerator(config: TrainConfig, machine: Machine):
    """An Accelerator that really runs data-parallel, also on a CPU-only machine."""
    from accelerate import Accelerator

    # Without cpu=True, ranks on a CPU-only machine each train alone; with it accelerate uses gloo.
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=machine.mixed_precision,
                              gradient_accumulation_steps=config.grad_accum)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise MixerError(f"launched {launched} processes but accelerate sees {accelerator.num_processes}: "
                         "the ranks would train independently; launch with torchrun or "
                         "`accelerate launch --multi_gpu`")
    return accelerator


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and conv kernels; never norms or biases (1-D tensors)."""
    decay, no_decay = [], []
    for (_, p) in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the original script) or AdamW with betas (momentum, 0.999) (the paper)."""
    groups = param_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))
    raise MixerError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")


def normalize(images: Tensor) -> Tensor:
    """uint8 (batch, H, W, 3) → float (batch, 3, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def standardize(x: Tensor) -> Tensor:
    return (x - MEAN) / STD


def epoch_batches(n: int, config: TrainConfig, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's row indices for each step of `epoch`; the last partial global batch is dropped.

    The global batch k is rows perm[k·B·world : (k+1)·B·world] and rank r takes its r-th slice,
    so `world` processes with batch B see exactly what one process with batch B·world sees.
    """
    per_step = config.batch_size * world
    steps = n // per_step
    if steps == 0:
        raise MixerError(f"batch_size {config.batch_size} × {world} process(es) exceeds the "
                         f"{n} training images")
    perm = np.random.default_rng([config.seed, epoch]).permutation(n)
    return [perm[k * per_step + rank * config.batch_size: k * per_step + (rank + 1) * config.batch_size]
            for k in range(steps)]


def steps_per_epoch(n: int, config: TrainConfig, world: int) -> int:
    return n // (config.batch_size * world) // config.grad_accum


@dataclass
class State:
    """What a checkpoint restores beyond the model and optimizer."""

    epoch: int = 0          # epochs completed
    step: int = 0           # optimizer steps taken
    best_accuracy: float = -1.0
    history: list[dict] = field(default_factory=list)


def train(model: MlpMixer, train_split: Split, val_split: Split, config: TrainConfig, output_dir: Path,
          machine: Machine = Machine(), resume: bool = False, logger=None,
          class_names: list[str] | None = None) -> dict:
    """Train `model`, checkpointing every epoch into `output_dir`; returns the last epoch's metrics."""
    accelerator = make_accelerator(config, machine)
    output_dir = Path(output_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    spe = steps_per_epoch(len(train_split), config, world)
    if spe == 0:
        raise MixerError(f"batch_size {config.batch_size} × grad_accum {config.grad_accum} × "
                         f"{world} process(es) exceeds the {len(train_split)} training images")
    num_classes = model.config.num_classes
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, spe, config.epochs, config.warmup_epochs, config.scheduler,
                                config.min_lr / config.lr)
    ema = make_ema(model, config.ema_decay)
    state = State()
    if resume:
        state = load_checkpoint(output_dir / CHECKPOINTS / "last.pt", model, optimizer, scheduler, ema)
    model, optimizer = accelerator.prepare(model, optimizer)
    if machine.compile:
        model = torch.compile(model)
    ema = ema.to(accelerator.device) if ema is not None else None
    progress = Progress(accelerator.is_main_process, machine.progress, config.epochs, spe)
    metrics: dict = state.history[-1] if state.history else {}

    for epoch in range(state.epoch, config.epochs):
        seed_epoch(config.seed, epoch, rank)
        g = torch.Generator(device=accelerator.device).manual_seed(config.seed * 100_003 + epoch * 101 + rank)
        model.train()
        started, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        batches = epoch_batches(len(train_split), config, epoch, rank, world)[: spe * config.grad_accum]
        for rows in batches:
            images, labels = to_device(train_split, rows, accelerator.device)
            targets = F.one_hot(labels, num_classes).float()
            if config.augment.active:
                images, targets = augment(images, targets, config.augment, g)
            with accelerator.accumulate(model), accelerator.autocast():
                logits = model(standardize(images))
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip_grad > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                scheduler.step()
                state.step += 1
                if ema is not None:
                    ema.update_parameters(accelerator.unwrap_model(model))
            seen += len(rows)
            loss_sum += loss.item() * len(rows)
            correct += int((logits.argmax(1) == labels).sum())
            progress.advance(epoch, loss.item())
        elapsed = time.perf_counter() - started
        totals = accelerator.reduce(torch.tensor([loss_sum, correct, seen], dtype=torch.float64,
                                                 device=accelerator.device), "sum")
        scored = ema.module if ema is not None else accelerator.unwrap_model(model)
        val = evaluate_split(scored, val_split, config.eval_batch_size, accelerator)
        metrics = {
            "epoch": epoch + 1,
            "train/loss": float(totals[0] / totals[2]),
            "train/accuracy": float(totals[1] / totals[2]),
            "val/loss": val["loss"],
            "val/accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": float(totals[2]) / max(elapsed, 1e-9),
        }
        state.epoch, state.history = epoch + 1, state.history + [metrics]
        is_best = val["accuracy"] > state.best_accuracy
        state.best_accuracy = max(state.best_accuracy, val["accuracy"])
        progress.epoch_done(metrics)
        if accelerator.is_main_process:
            save_checkpoint(output_dir / CHECKPOINTS, accelerator.unwrap_model(model), optimizer,
                            scheduler, ema, state, is_best)
            if logger is not None:
                logger(metrics)
        accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        final = ema.module if ema is not None else accelerator.unwrap_model(model)
        save_model(final, output_dir, class_names, mean=(MEAN,) * 3, std=(STD,) * 3)
    accelerator.wait_for_everyone()
    progress.close()
    return metrics


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed the global generators (dropout, stochastic depth) from (seed, epoch, rank)."""
    torch.manual_seed(seed * 100_003 + epoch * 101 + rank + 1)


def to_device(split: Split, rows: np.ndarray, device) -> tuple[Tensor, Tensor]:
    """A batch of uint8 rows → float images in [0, 1] on `device`, and their labels."""
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows])).to(device, non_blocking=True)
    labels = torch.from_numpy(split.labels[rows]).to(device)
    return normalize(images), labels


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights, updated after every optimizer step."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.inference_mode()
def predict(model: nn.Module, split: Split, batch_size: int, accelerator=None,
            device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Logits and labels of every image of `split`, in order; with several processes each rank
    scores rows r, r + world, … and the results are gathered without duplicates."""
    world = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    device = accelerator.device if accelerator else device
    was_training = model.training
    model.eval()
    mine = np.arange(rank, len(split), world)
    logits = [model(standardize(to_device(split, mine[i:i + batch_size], device)[0])).float()
              for i in range(0, len(mine), batch_size)]
    local = torch.cat(logits) if logits else torch.zeros(0, model.head.out_features, device=device)
    model.train(was_training)
    if world == 1:
        return local.cpu(), torch.from_numpy(split.labels)
    padded = accelerator.pad_across_processes(local, dim=0)
    gathered = accelerator.gather(padded).view(world, -1, local.shape[1])
    order = torch.zeros(len(split), local.shape[1])
    for r in range(world):
        rows = np.arange(r, len(split), world)
        order[rows] = gathered[r, : len(rows)].cpu()
    return order, torch.from_numpy(split.labels)


def evaluate_split(model: nn.Module, split: Split, batch_size: int, accelerator=None) -> dict:
    """Loss and top-1 accuracy of `model` on a split."""
    logits, labels = predict(model, split, batch_size, accelerator)
    return {"loss": float(F.cross_entropy(logits, labels)),
            "accuracy": float((logits.argmax(1) == labels).float().mean())}


# ---- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, ema, state: State,
                    is_best: bool) -> None:
    """Write the full training state to `last.pt` (and `best.pt`) atomically: temp file + rename."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": state.epoch,
        "step": state.step,
        "best_accuracy": state.best_accuracy,
        "history": state.history,
        "rng": {"torch": torch.get_rng_state()},
    }

    def write(tmp: Path) -> None:
        torch.save(payload, tmp)
        _pause_for_tests(state.epoch)

    atomic_write(directory / "last.pt", write)
    if is_best:
        atomic_write(directory / "best.pt", lambda tmp: torch.save(payload, tmp))


def _pause_for_tests(epoch: int) -> None:
    """Fault injection: the resume test kills the process while this epoch's checkpoint is half-saved."""
    if os.environ.get("MIXER_TEST_PAUSE_SAVE_AT_EPOCH") == str(epoch):
        print(f"saving checkpoint of epoch {epoch}", flush=True)
        time.sleep(60)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, ema) -> State:
    """Restore a `last.pt` written by `save_checkpoint` (tensors only: nothing is unpickled)."""
    if not path.is_file():
        raise MixerError(f"cannot resume: no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file: torch raises several types here
        raise MixerError(f"cannot resume: {path} is unreadable ({type(exc).__name__})") from None
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if ema is not None:
        if payload["ema"] is None:
            raise MixerError(f"cannot resume: {path} was written without EMA but ema_decay is set")
        ema.load_state_dict(payload["ema"])
    torch.set_rng_state(payload["rng"]["torch"])
    return State(payload["epoch"], payload["step"], payload["best_accuracy"], payload["history"])


# ---- progress --------------------------------------------------------------------------------

class Progress:
    """A rich bar (loss, images/s, ETA) on a terminal; one plain line per epoch otherwise."""

    def __init__(self, enabled: bool, bar: bool | None, epochs: int, steps: int):
        self.enabled = enabled
        self.bar = None
        if enabled and (bar if bar is not None else sys.stdout.isatty()):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeRemainingColumn)

            self.bar = RichProgress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=epochs * steps, epoch=0, loss=math.nan)
            self.bar.start()

    def advance(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, epoch=epoch + 1, loss=loss)

    def epoch_done(self, m: dict) -> None:
        if not self.enabled:
            return
        line = (f"epoch {m['epoch']}: train loss {m['train/loss']:.4f} acc {m['train/accuracy']:.4f} | "
                f"val loss {m['val/loss']:.4f} acc {m['val/accuracy']:.4f} | lr {m['lr']:.2e} | "
                f"{m['images_per_second']:.0f} img/s")
        if self.bar is not None:
            self.bar.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
