"""The training loop on HF Accelerate: one CPU, GPUs, or several processes, the same code.

`train` reads in the order of accelerate's examples: prepare, forward, backward, clip, step,
schedule, log. Evaluation (`mixer.evaluation`), the checkpoint file (`mixer.train_state`) and
what the outside sees (`Reporter`) are calls to small named pieces.

A run stops and continues at any optimizer step with the same result. The order of the images is a
function of (seed, epoch), and each micro-batch draws its augmentation and dropout from generators
seeded by (seed, epoch, micro-batch, rank), so a checkpoint holds a position, never random state.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mixer import probe, train_state
from mixer.augment import AugmentConfig, augment
from mixer.checkpoint import CONFIG, load_model, read_config, save_model
from mixer.data import Split
from mixer.errors import MixerError
from mixer.evaluation import evaluate_split
from mixer.hparams import Rule, at_least, between, check, fraction, hp, one_of, positive
from mixer.launch import processes
from mixer.model import MlpMixer
from mixer.optim import build_optimizer, make_ema, use_fused, wants_fused
from mixer.preprocess import Preprocessing
from mixer.schedule import build_scheduler
from mixer.train_state import CheckpointTimer, Every, RunningSums, TrainState, start_or_continue


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of a run (`key=`: the params.yaml name, the original train.py's)."""

    epochs: int = hp(40, "training epochs", key="num_steps", rule=between(1, 100_000), original=30)
    batch_size: int = hp(64, "images per micro-batch and process", rule=at_least(1), original=16,
                         fingerprint=False)  # the engine records the global batch: a run may change processes
    lr: float = hp(3.0e-3, "peak learning rate", rule=positive(), original=1.0e-3)
    optimizer: str = hp("adamw", "sgd (with momentum) or adamw (betas momentum, 0.999)",
                        rule=one_of("sgd", "adamw"), original="sgd")
    momentum: float = hp(0.9, "SGD momentum (also AdamW's beta1)", rule=fraction(), original=0.9)
    weight_decay: float = hp(0.05, "weight decay (not applied to norms and biases)", key="decay",
                             rule=at_least(0), original=0.0)
    warmup_epochs: int = hp(3, "linear warm-up epochs", key="warmup_step", rule=between(0, 100_000), original=10)
    scheduler: str = hp("cosine", "decay after warm-up", rule=one_of("cosine", "linear"), original="cosine")
    min_lr: float = hp(0.0, "learning-rate floor at the end of the decay (at most lr)", rule=at_least(0))
    layer_decay: float = hp(1.0, "layer-wise lr decay: block i of depth trains at lr·layer_decay^(depth-i), the "
                            "stem one step lower, the head at lr (BEiT, timm); 1: off",
                            rule=Rule("in (0, 1]", lambda v: 0 < v <= 1))
    clip_grad: float = hp(1.0, "clip gradients to this global norm (0: off)", rule=at_least(0))
    label_smoothing: float = hp(0.0, "label smoothing of the cross-entropy", rule=fraction())
    grad_accum: int = hp(1, "micro-batches accumulated per optimizer step", rule=between(1, 4096))
    ema_decay: float = hp(0.0, "EMA of weights per step (0: off); the EMA is evaluated and saved", rule=fraction())
    seed: int = hp(0, "seed for the split, initialisation, shuffling and augmentation", stages="prepare train",
                   rule=Rule("in 0 .. 2**32 - 1", lambda v: 0 <= v < 2**32))
    eval_batch_size: int = hp(256, "images per batch when evaluating", stages="train evaluate", rule=at_least(1),
                              affects=False)
    keep: str = hp("last", "the model train delivers: the last epoch's (as Keras and the HF Trainer), or the "
                   "epoch of the best val accuracy (timm's model_best)", rule=one_of("last", "best"),
                   fingerprint=False)  # both are on disk at the end
    freeze: str = hp("none", "none: train every weight; features: train only the head (a linear probe of "
                     "the checkpoint's features)", rule=one_of("none", "features"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        check(self)
        if self.min_lr > self.lr:
            raise MixerError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}")

    @property
    def freeze_features(self) -> bool:
        return self.freeze == "features"


@dataclass(frozen=True)
class Machine:
    """Where and how fast a run goes; never what it computes (beyond float rounding)."""

    mixed_precision: str = "no"
    compile: bool = False
    checkpoint_every: Every | None = None     # also checkpoint inside epochs
    stop: threading.Event | None = None       # once set: finish the step, checkpoint, raise Interrupted
    cache_features: bool = True               # a probe without augmentation: compute features once
    log_every: int = 50                       # optimizer steps between reads of the running loss (a host sync)
    grad_checkpointing: bool = False          # recompute each block's activations in the backward (less memory)

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise MixerError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():  # Accelerate would run fp32, silently
            raise MixerError("--mixed-precision fp16 needs a CUDA GPU, and this machine has none (on a CPU it would "
                             "train in fp32); use --mixed-precision no, or bf16 where the CPU has it natively")


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

    def step(self, state: TrainState) -> None:
        """After every optimizer step."""

    def progress(self, state: TrainState, loss: float) -> None:
        """Every `Machine.log_every` optimizer steps: the epoch's mean training loss so far."""

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
    kept: dict = field(default_factory=dict)  # which epoch's weights `model` holds (`keep`)
    folder: Path | None = None   # the run's checkpoint folder (last.pt, best/)


def make_accelerator(grad_accum: int, machine: Machine):
    """An Accelerator that really runs data-parallel, also on a CPU-only machine."""
    from accelerate import Accelerator

    # Without cpu=True, ranks on a CPU-only machine each train alone; with it accelerate uses gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=machine.mixed_precision,
                              gradient_accumulation_steps=grad_accum)
    launched = processes()
    if (accelerator.num_processes, accelerator.process_index) != (launched.world, launched.rank):
        raise MixerError(f"launched as process {launched.rank} of {launched.world} but accelerate sees process "
                         f"{accelerator.process_index} of {accelerator.num_processes}: the ranks would train "
                         "independently; launch with torchrun or `accelerate launch --multi_gpu`")
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
          reporter: Reporter | None = None, record: dict | None = None) -> Result:
    """Train `model`, checkpointing into its run's folder under `run_dir`, the folder of all the runs of one
    output (named by the fingerprint, see mixer.train_state); continue the checkpointed run of the same
    fingerprint.

    resume: None continues this run's checkpoint if there is one and starts anew otherwise; True
    requires one (only other runs' is an error; none at all starts anew, with a note); False always
    starts anew. Other runs' folders are kept. record: what every model the run saves records besides
    its weights (`mixer.checkpoint.save_model`'s source and trained_on): best/ as the delivered model.
    """
    accelerator = make_accelerator(config.grad_accum, machine)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    reporter = reporter if reporter is not None and main else Reporter()
    spe = steps_per_epoch(len(train_split), config, world)
    learner = _learner(model, train_split, val_split, preprocessing, config, machine, accelerator.device, reporter)
    model.set_grad_checkpointing(machine.grad_checkpointing)  # before prepare: DDP and compile wrap it as it is
    # the kernel for the device the parameters are about to move to (prepare moves them; built before, on the host)
    fused = wants_fused(accelerator.device)
    optimizer = build_optimizer(learner.module, config.optimizer, config.lr, config.momentum, config.weight_decay,
                                fused=fused, layer_decay=config.layer_decay)
    scheduler = build_scheduler(optimizer, spe, config.epochs, config.warmup_epochs, config.scheduler,
                                config.min_lr / config.lr)
    ema = make_ema(learner.module, config.ema_decay)
    # The global batch, not the per-process one: one process × 2B continues two processes × B.
    fingerprint = {**(fingerprint or {}), "global_batch": config.batch_size * world, **learner.fingerprint}
    if main:
        train_state.adopt_legacy(Path(run_dir), reporter.note)  # never raises: the others wait for it
    accelerator.wait_for_everyone()  # before any process reads its state
    state, run_dir = start_or_continue(Path(run_dir), fingerprint, resume, config.epochs, main, learner.module,
                                       optimizer, scheduler, ema, reporter.note)
    use_fused(optimizer, fused)  # a checkpoint's groups carry the kernel of the machine that wrote it
    module, optimizer = accelerator.prepare(learner.module, optimizer)
    if machine.compile:
        module = torch.compile(module)
    ema = ema.to(accelerator.device) if ema is not None else None
    run = _Run(accelerator, module, optimizer, scheduler, ema, state, run_dir, reporter,
               CheckpointTimer(machine.checkpoint_every, state.step), record or {})
    generator = torch.Generator(device=accelerator.device)
    reporter.start(state, config.epochs, spe)
    for epoch in range(state.epoch, config.epochs):
        learner.train_mode(run.unwrapped())
        batches = epoch_batches(len(learner.train), config.batch_size, config.seed, epoch, rank, world)
        first, resumed = state.step_in_epoch * config.grad_accum, state.sums.images
        sums, started = _DeviceSums(state.sums if main else RunningSums(), accelerator.device), time.perf_counter()
        for (index, (images, labels)) in enumerate(prefetched(learner.train, batches[first:spe * config.grad_accum],
                                                               accelerator.device), start=first):
            seed_micro_batch(config.seed, epoch, index, rank, generator)
            targets = torch.zeros(len(labels), model.config.num_classes, device=labels.device).scatter_(
                1, labels[:, None], 1.0)  # F.one_hot checks the labels' range on the host: a sync
            if config.augment.active:
                images, targets = augment(images, targets, config.augment, generator)
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    logits = module(learner.preprocessing.standardize(images))
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.clip_grad > 0:
                    accelerator.clip_grad_norm_(module.parameters(), config.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            sums.add(loss.detach(), logits.detach(), labels, state.step + 1)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema is not None:
                ema.update_parameters(run.unwrapped())
            state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
            reporter.step(state)
            if state.step_in_epoch < spe:  # the end of an epoch reads the sums and checkpoints anyway
                run.between_steps(sums, epoch, config, machine)
        metrics = run.end_epoch(sums, epoch, config, learner, resumed, time.perf_counter() - started)
        reporter.epoch(metrics)
        if run.agree(machine.stop, False)[0] and epoch + 1 < config.epochs:
            raise Interrupted(state, Path(run_dir) / train_state.LAST)
    model, kept = _kept(learner.deliver(run.scored()), config, run_dir, state, main)
    return Result(model, state.history[-1], state, main, kept, run_dir)


def _kept(last: MlpMixer, config: TrainConfig, run_dir: Path, state: TrainState, main: bool) -> tuple[MlpMixer, dict]:
    """The model the run delivers, and which epoch's it is: the last epoch's, or (`keep: best`) that of the
    best val accuracy, which the run folder's best/ holds since that epoch (its config.json says which)."""
    epoch = state.epoch
    if config.keep == "best" and main:  # only the main process saves the model, and only it wrote best/
        best = run_dir / train_state.BEST
        recorded = read_config(best).get("kept", {}).get("epoch") if (best / CONFIG).exists() else None
        if recorded is not None and recorded != state.epoch:
            model = load_model(best).to(next(last.parameters()).device)
            model.source, last, epoch = last.source, model, recorded
    return last, {"keep": config.keep, "epoch": epoch, "of": state.epoch,
                  "val_accuracy": state.history[epoch - 1]["val/accuracy"]}


def _learner(model, train_split, val_split, preprocessing, config, machine, device, reporter) -> probe.Learner:
    """What the loop trains: the model on images, or for `freeze: features` a probe (mixer.probe)."""
    if not config.freeze_features:
        return probe.Learner(model, train_split, val_split, preprocessing)
    if config.augment.active:
        reporter.note("freeze: features with augmentation: the frozen layers run on every batch (without "
                      "augmentation each image's features are computed once)")
    cache = machine.cache_features and not config.augment.active
    return probe.learner(model, train_split, val_split, preprocessing, config.eval_batch_size, device, cache)


def prefetched(split, batches: list[np.ndarray], device) -> Iterator[tuple[Tensor, Tensor]]:
    """Each micro-batch of `batches` on `device`, in order: a thread gathers the next one (into pinned
    memory on a GPU, copied without blocking) while the caller trains on this one."""
    pin = torch.device(device).type == "cuda"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gather") as pool:
        ahead = pool.submit(split.gather, batches[0], pin) if batches else None
        for k in range(len(batches)):
            images, labels = ahead.result()
            if k + 1 < len(batches):
                ahead = pool.submit(split.gather, batches[k + 1], pin)
            yield split.on_device(images.to(device, non_blocking=pin)), labels.to(device, non_blocking=pin)


class _DeviceSums:
    """The epoch's running sums where the loss is (read back only when asked: each read waits for the
    device), and the first optimizer step whose loss was not finite."""

    def __init__(self, start: RunningSums, device):
        self.values = torch.tensor([start.loss, start.correct, start.images, -1.0, 0.0], dtype=torch.float64,
                                   device=device)

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor, step: int) -> None:
        n = len(labels)
        bad = ~torch.isfinite(loss) & (self.values[3] < 0)
        update = torch.stack([loss.double() * n, (logits.argmax(1) == labels).sum().double(),
                              torch.ones((), dtype=torch.float64, device=loss.device) * n])
        self.values[:3] += update
        self.values[3:] = torch.where(bad, torch.stack([torch.full_like(self.values[3], step), loss.double()]),
                                      self.values[3:])

    def read(self, accelerator, config: TrainConfig, epoch: int) -> RunningSums:
        """The sums, summed over processes; a one-line error if any step's loss was not finite."""
        values = self.values
        if accelerator.num_processes > 1:  # the sums added up; the first bad step of any process
            first = torch.where(values[3:4] < 0, torch.full_like(values[3:4], float("inf")), values[3:4])
            first = -accelerator.reduce(-first, "max")  # the earliest bad step of any process (inf: none)
            values = torch.cat([accelerator.reduce(values[:3].clone(), "sum"),
                                torch.where(torch.isinf(first), torch.full_like(first, -1.0), first), values[4:]])
        loss, correct, images, bad, bad_loss = values.tolist()
        if bad >= 0:
            raise MixerError(f"training diverged at epoch {epoch + 1}, step {int(bad)}: the loss is "
                             f"{bad_loss if bad == self.values[3] else 'not finite'}; lower lr (now {config.lr}) "
                             "or raise clip_grad")
        return RunningSums(loss, correct, images)


@dataclass
class _Run:
    """What the loop carries from step to step, and what it does between steps and epochs."""

    accelerator: object
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object
    state: TrainState
    run_dir: Path
    reporter: Reporter
    timer: CheckpointTimer
    record: dict                 # save_model's source and trained_on, for best/

    def unwrapped(self) -> torch.nn.Module:  # without DDP and torch.compile: state dict keys as the model's own
        return self.accelerator.unwrap_model(self.module, keep_torch_compile=False)

    def scored(self) -> torch.nn.Module:
        """The weights that are evaluated and saved: the EMA's when it is on."""
        return self.ema.module if self.ema is not None else self.unwrapped()

    def agree(self, stop: threading.Event | None, due: bool) -> tuple[bool, bool]:
        """Whether any process was asked to stop, and whether any has a checkpoint due: all ranks agree."""
        flags = [stop is not None and stop.is_set(), due]
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            tensor = torch.tensor(flags, dtype=torch.int32, device=self.accelerator.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = [bool(v) for v in tensor.tolist()]
        return flags[0], flags[1]

    def between_steps(self, sums: _DeviceSums, epoch: int, config: TrainConfig, machine: Machine) -> None:
        """Every `log_every` steps: read the running loss (and stop on divergence). A single process checks
        for a stop request or a due checkpoint after every step (host flags, no sync); several processes
        agree on them only at those reads, since agreeing is a collective that waits for all of them."""
        state, several = self.state, self.accelerator.num_processes > 1
        so_far = sums.read(self.accelerator, config, epoch) if state.step % machine.log_every == 0 else None
        if so_far is not None:
            self.reporter.progress(state, so_far.loss / max(so_far.images, 1))
        elif several:
            return
        stop, due = self.agree(machine.stop, self.timer.due(state.step))
        if stop or due:  # the sums just read, or (one process, between reads) read now
            self.checkpoint(so_far or sums.read(self.accelerator, config, epoch))
        if stop:
            raise Interrupted(state, Path(self.run_dir) / train_state.LAST)

    def end_epoch(self, sums: _DeviceSums, epoch: int, config: TrainConfig, learner, resumed: float,
                  seconds: float) -> dict:
        """Score the epoch, record it and checkpoint; `resumed`: the images of the epoch trained before a resume."""
        totals = sums.read(self.accelerator, config, epoch)
        val = evaluate_split(self.scored(), learner.val, learner.preprocessing, config.eval_batch_size,
                             self.accelerator)
        state = self.state
        metrics = {
            "epoch": epoch + 1,
            "train/loss": totals.loss / totals.images,
            "train/accuracy": totals.correct / totals.images,
            "val/loss": val["loss"],
            "val/accuracy": val["accuracy"],
            "lr": max(group["lr"] for group in self.optimizer.param_groups),  # the head's, with layer_decay
            "images_per_second": (totals.images - resumed) / max(seconds, 1e-9),
        }
        best = val["accuracy"] > state.best_accuracy
        state.epoch, state.step_in_epoch, state.sums = epoch + 1, 0, RunningSums()
        state.history = state.history + [metrics]
        state.best_accuracy = max(state.best_accuracy, val["accuracy"])
        self.checkpoint(RunningSums(), best=best, deliver=learner.deliver)
        return metrics

    def checkpoint(self, sums: RunningSums, best: bool = False, deliver=None) -> None:
        """Write last.pt (and on a new best val accuracy, the best model): the main process writes."""
        self.state.sums = sums
        if self.accelerator.is_main_process:
            if best:  # before last.pt, which records it as best: a kill between the two leaves an older best
                # with its own epoch in its config.json, never last.pt naming a best that was not written
                save_model(deliver(self.scored()), Path(self.run_dir) / train_state.BEST,
                           kept={"keep": "best", "epoch": self.state.epoch}, **self.record)
            path, size, seconds = train_state.save(self.run_dir, self.state, self.unwrapped(), self.optimizer,
                                                   self.scheduler, self.ema)
            self.reporter.checkpoint(self.state, path, size, seconds)
        self.accelerator.wait_for_everyone()
        self.timer.restart(self.state.step)
