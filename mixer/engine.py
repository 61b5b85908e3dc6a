"""The training loop on HF Accelerate: one CPU, GPUs, or several processes, the same code.

`train` reads in the order of accelerate's examples: prepare, forward, backward, clip, step,
schedule, log. Evaluation (`mixer.evaluation`), the checkpoint file (`mixer.train_state`) and
what the outside sees (`Reporter`) are calls to small named pieces.

A run stops and continues at any optimizer step with the same result. The order of the images is a
function of (seed, epoch), and each micro-batch draws its augmentation and dropout from generators
seeded by (seed, epoch, micro-batch, rank), so a checkpoint holds a position, never random state.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixer import probe, train_state
from mixer.augment import AugmentConfig, augment
from mixer.checkpoint import save_model
from mixer.data import Split
from mixer.errors import MixerError
from mixer.evaluation import evaluate_split
from mixer.model import MlpMixer
from mixer.optim import build_optimizer, make_ema
from mixer.preprocess import Preprocessing
from mixer.schedule import build_scheduler
from mixer.train_state import CheckpointTimer, Every, TrainState, start_or_continue


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of a run. Their defaults live in one place: params.yaml."""

    epochs: int
    batch_size: int          # per process and micro-batch
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    warmup_epochs: int
    scheduler: str
    min_lr: float
    clip_grad: float
    label_smoothing: float
    grad_accum: int
    ema_decay: float
    seed: int
    eval_batch_size: int
    augment: AugmentConfig
    freeze_features: bool = False  # train only the head (a linear probe)


@dataclass(frozen=True)
class Machine:
    """Where and how fast a run goes; never what it computes (beyond float rounding)."""

    mixed_precision: str = "no"
    compile: bool = False
    checkpoint_every: Every | None = None     # also checkpoint inside epochs
    stop: threading.Event | None = None       # once set: finish the step, checkpoint, raise Interrupted
    cache_features: bool = True               # a probe without augmentation: compute features once


class Interrupted(Exception):
    """Training stopped on request, after writing a checkpoint it can continue from."""

    def __init__(self, state: TrainState, path: Path):
        super().__init__(f"stopped at epoch {state.epoch + 1}, step {state.step}; {path} holds the run")
        self.state, self.path = state, path


class Reporter:
    """What the loop tells the outside world (a progress bar, dvclive); this one tells no one.

    Only the main process reports.
    """

    def start(self, state: TrainState, epochs: int, steps_per_epoch: int) -> None:
        """Called once, before the first step; `state.history` holds the epochs already done."""

    def step(self, state: TrainState, loss: float) -> None:
        """After every optimizer step."""

    def epoch(self, metrics: dict) -> None:
        """After an epoch, once its checkpoint is on disk."""

    def checkpoint(self, state: TrainState, path: Path, size: int, seconds: float) -> None:
        """After a checkpoint is written."""

    def note(self, text: str) -> None:
        """Something the user should know (a resume, a new run)."""


@dataclass
class Result:
    model: MlpMixer              # the trained weights (the EMA's when it is on)
    metrics: dict                # the last epoch's
    state: TrainState
    is_main_process: bool


def make_accelerator(grad_accum: int, machine: Machine):
    """An Accelerator that really runs data-parallel, also on a CPU-only machine."""
    from accelerate import Accelerator

    # Without cpu=True, ranks on a CPU-only machine each train alone; with it accelerate uses gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=machine.mixed_precision,
                              gradient_accumulation_steps=grad_accum)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise MixerError(f"launched {launched} processes but accelerate sees {accelerator.num_processes}: "
                         "the ranks would train independently; launch with torchrun or "
                         "`accelerate launch --multi_gpu`")
    return accelerator


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's row indices for each micro-batch of `epoch`; the last partial global batch is dropped.

    Global micro-batch k is rows perm[k·B·world : (k+1)·B·world] and rank r takes its r-th slice,
    so `world` processes with batch B see exactly what one process with batch B·world sees.
    """
    per_step = batch_size * world
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[k * per_step + rank * batch_size: k * per_step + (rank + 1) * batch_size]
            for k in range(n // per_step)]


def steps_per_epoch(n: int, config: TrainConfig, world: int) -> int:
    """Optimizer steps in an epoch; a clear error when there are none."""
    steps = n // (config.batch_size * world) // config.grad_accum
    if steps == 0:
        raise MixerError(f"batch_size {config.batch_size} × grad_accum {config.grad_accum} × {world} process(es) "
                         f"exceeds the {n} training images; lower batch_size")
    return steps


def seed_micro_batch(seed: int, epoch: int, index: int, rank: int, generator: torch.Generator) -> None:
    """Seed this micro-batch's randomness: `generator` (augmentation) and torch's (dropout, drop path)."""
    augmentation, dropout = np.random.SeedSequence([seed, epoch, index, rank]).generate_state(2, np.uint64)
    generator.manual_seed(int(augmentation))
    torch.manual_seed(int(dropout))


def train(model: MlpMixer, train_split: Split, val_split: Split, config: TrainConfig, preprocessing: Preprocessing,
          run_dir: Path, fingerprint: dict | None = None, machine: Machine = Machine(), resume: bool | None = None,
          reporter: Reporter | None = None) -> Result:
    """Train `model`, checkpointing into `run_dir`; continue a checkpointed run of the same fingerprint.

    resume: None continues the run in `run_dir` if it is this run (same fingerprint) and starts anew
    otherwise, with a note; True requires the same run (another run's checkpoint is an error; no
    checkpoint starts anew, with a note); False always starts anew.
    """
    reporter = reporter or Reporter()
    accelerator = make_accelerator(config.grad_accum, machine)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    reporter = reporter if main else Reporter()
    spe = steps_per_epoch(len(train_split), config, world)
    num_classes = model.config.num_classes
    full = model  # what is saved and returned; `model` is what learns
    cached = config.freeze_features and machine.cache_features and not config.augment.active
    if config.freeze_features:
        probe.freeze_features(model)
        if cached:
            model = probe.Probe(model.head)
        elif config.augment.active:
            reporter.note("freeze: features with augmentation: the frozen layers run on every batch (without "
                          "augmentation each image's features are computed once)")

    def deliverable(trained) -> MlpMixer:
        return probe.with_head(full, trained) if isinstance(trained, probe.Probe) else trained

    optimizer = build_optimizer(model, config.optimizer, config.lr, config.momentum, config.weight_decay)
    scheduler = build_scheduler(optimizer, spe, config.epochs, config.warmup_epochs, config.scheduler,
                                config.min_lr / config.lr)
    ema = make_ema(model, config.ema_decay)
    # The global batch, not the per-process one: one process × 2B continues two processes × B. A cached
    # probe's checkpoint holds only the head: it continues only a cached probe.
    fingerprint = {**(fingerprint or {}), "global_batch": config.batch_size * world,
                   **({"trains": "head"} if cached else {})}
    state = start_or_continue(Path(run_dir), fingerprint, resume, config.epochs, main, model, optimizer, scheduler,
                              ema, reporter.note)
    if cached:
        full.to(accelerator.device)
        if state.epoch < config.epochs:
            train_split, val_split = (probe.features_of(full, split, preprocessing, config.eval_batch_size,
                                                        accelerator.device) for split in (train_split, val_split))
        preprocessing = probe.AS_IS
    model, optimizer = accelerator.prepare(model, optimizer)
    if machine.compile:
        model = torch.compile(model)
    ema = ema.to(accelerator.device) if ema is not None else None
    timer = CheckpointTimer(machine.checkpoint_every, state.step)

    def unwrap(m):  # without DDP and torch.compile's wrappers: state dict keys as the model's own
        return accelerator.unwrap_model(m, keep_torch_compile=False)

    generator = torch.Generator(device=accelerator.device)
    reporter.start(state, config.epochs, spe)

    def checkpoint(best: bool = False) -> Path:
        state.sums = accelerator.reduce(torch.tensor(state.sums, dtype=torch.float64, device=accelerator.device),
                                        "sum").tolist() if world > 1 else state.sums
        path = Path(run_dir) / train_state.LAST
        if main:
            path, size, seconds = train_state.save(run_dir, state, unwrap(model), optimizer,
                                                   scheduler, ema)
            if best:
                save_model(deliverable(ema.module if ema is not None else unwrap(model)),
                           Path(run_dir) / train_state.BEST)
            reporter.checkpoint(state, path, size, seconds)
        if world > 1:  # other ranks start the next epoch's sums from zero: rank 0 holds them
            state.sums = state.sums if main else [0.0, 0.0, 0.0]
        accelerator.wait_for_everyone()
        timer.restart(state.step)
        return path

    for epoch in range(state.epoch, config.epochs):
        model.train()
        if config.freeze_features:
            probe.eval_frozen(unwrap(model))
        batches = epoch_batches(len(train_split), config.batch_size, config.seed, epoch, rank, world)
        started, timed = time.perf_counter(), 0
        for index in range(state.step_in_epoch * config.grad_accum, spe * config.grad_accum):
            seed_micro_batch(config.seed, epoch, index, rank, generator)
            images, labels = train_split.batch(batches[index], accelerator.device)
            targets = F.one_hot(labels, num_classes).float()
            if config.augment.active:
                images, targets = augment(images, targets, config.augment, generator)
            with accelerator.accumulate(model), accelerator.autocast():
                logits = model(preprocessing.standardize(images))
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip_grad > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(loss.item()):
                raise MixerError(f"training diverged at epoch {epoch + 1}, step {state.step + 1}: the loss is "
                                 f"{loss.item()}; lower lr (now {config.lr}) or raise clip_grad")
            state.sums[0] += loss.item() * len(labels)
            state.sums[1] += int((logits.argmax(1) == labels).sum())
            state.sums[2] += len(labels)
            timed += len(labels)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.update_parameters(unwrap(model))
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            reporter.step(state, loss.item())
            if state.step_in_epoch < spe:  # the end of an epoch checkpoints anyway
                stop, due = agree(accelerator, machine.stop, timer.due(state.step))
                if stop or due:
                    path = checkpoint()
                if stop:
                    raise Interrupted(state, path)
        elapsed = time.perf_counter() - started
        scored = ema.module if ema is not None else unwrap(model)
        val = evaluate_split(scored, val_split, preprocessing, config.eval_batch_size, accelerator)
        totals = accelerator.reduce(torch.tensor([*state.sums, timed], dtype=torch.float64,
                                                 device=accelerator.device), "sum").tolist()
        metrics = {
            "epoch": epoch + 1,
            "train/loss": totals[0] / totals[2],
            "train/accuracy": totals[1] / totals[2],
            "val/loss": val["loss"],
            "val/accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": totals[3] / max(elapsed, 1e-9),
        }
        best = val["accuracy"] > state.best_accuracy
        state.epoch, state.step_in_epoch, state.sums = epoch + 1, 0, [0.0, 0.0, 0.0]
        state.history = state.history + [metrics]
        state.best_accuracy = max(state.best_accuracy, val["accuracy"])
        path = checkpoint(best)
        reporter.epoch(metrics)
        if agree(accelerator, machine.stop, False)[0] and epoch + 1 < config.epochs:
            raise Interrupted(state, path)

    final = deliverable(ema.module if ema is not None else unwrap(model))
    return Result(final, state.history[-1], state, main)


def agree(accelerator, stop: threading.Event | None, due: bool) -> tuple[bool, bool]:
    """Whether any process was asked to stop, and whether any has a checkpoint due: all ranks agree."""
    flags = [stop is not None and stop.is_set(), due]
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        tensor = torch.tensor(flags, dtype=torch.int32, device=accelerator.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        flags = [bool(v) for v in tensor.tolist()]
    return flags[0], flags[1]
