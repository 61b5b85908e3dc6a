"""Stage `train`: prepared/ → output_dir/ (the model) and reports/train/ (dvclive's curves).

The run's checkpoints live in checkpoints/<output_dir>/, which DVC does not own (DVC deletes or
checks out a stage's outputs when its params change), so there they survive a kill, and `dvc repro`
(or the same `mixer train`) continues the run. Both outputs are replaced only when training succeeds.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from mixer.checkpoint import environment, save_model
from mixer.data import Prepared, open_prepared
from mixer.engine import Interrupted, Machine, TrainConfig, steps_per_epoch, train
from mixer.errors import MixerError
from mixer.launch import processes
from mixer.model import MixerConfig, MlpMixer, at_image_shape, config_at, variant_config
from mixer.pretrained import is_remote, load_pretrained, pretrained_config
from mixer.resources import check_training_memory, format_bytes
from mixer.preprocess import Preprocessing
from mixer.text import shown
from mixer.train_state import TrainState
from pipeline.orphan import stop_when_dvc_dies
from pipeline.outputs import MODEL, RUN, TRAIN_LOG as LOG, Plan, Target, project_places, writing
from pipeline.params import Params, build, fingerprint_keys, input_shape, load_params, notes
from pipeline.paths import CHECKPOINTS, PREPARED, TRAIN_LOG
from pipeline.progress import ConsoleReporter

SMALL_VAL = 1000  # val images below which a best epoch is a few images ahead of the others, within noise


def train_config(p: Params) -> TrainConfig:
    """The run's hyperparameters: TrainConfig's declared keys, from the params."""
    return build(TrainConfig, p)


def architecture(p: Params, num_classes: int, image_shape: tuple[int, int]) -> MixerConfig:
    """The architecture the params ask for: their fields, or a paper variant's (hidden widths given still win)."""
    if p.variant is None:
        return build(MixerConfig, p, image_shape=image_shape, num_classes=num_classes)
    return variant_config(p.variant, image_shape=image_shape, num_classes=num_classes, token_hidden=p.token_hidden,
                          channel_hidden=p.channel_hidden, dropout=p.dropout, drop_path=p.drop_path)


def model_config(p: Params, num_classes: int | None = None, checkpoint: MixerConfig | None = None) -> MixerConfig:
    """The architecture `train` builds for these params: the checkpoint's at image_shape (token mixing
    expanded) with a head for the data's classes, or the params' own. The one home of that decision
    (`check`'s memory estimate and `bench` ask it too). `num_classes`: the data's, when known; else
    num_classes, else the checkpoint's, else 1000 (a bound). `checkpoint`: its architecture, when loaded."""
    if p.checkpoint is not None:
        have = config_at(checkpoint or pretrained_config(p.checkpoint), p.image_shape)
        return replace(have, num_classes=num_classes or p.num_classes or have.num_classes)
    return architecture(p, num_classes or p.num_classes or 1000, p.image_shape)


def check_memory(p: Params, config: MixerConfig | None = None, processes: int = 1,
                 grad_checkpointing: bool = False) -> int:
    """Refuse params whose training step (or validation) cannot fit in this machine's memory; returns the
    estimate in bytes. `config`: the model's architecture when it is known; else `model_config`'s bound.
    `grad_checkpointing`: the machine setting (`mixer train --grad-checkpointing`), which keeps fewer activations.
    """
    config = config or model_config(p)
    return check_training_memory(config, p.batch_size, variant=p.variant if p.checkpoint is None else None,
                                 optimizer=p.optimizer, ema=p.ema_decay > 0, frozen=p.freeze == "features",
                                 processes=processes, grad_checkpointing=grad_checkpointing,
                                 eval_batch_size=p.eval_batch_size)


def memory_line(need: int, p: Params, machine: Machine) -> str:
    """The estimate `check_memory` made, as the line `mixer train` prints before training.

    The estimate counts 4-byte values: under --mixed-precision the activations are partly half-size
    and autocast keeps half-size copies of the weights, which it does not model."""
    precision = "fp32" + ("" if machine.mixed_precision == "no" else
                          f" ({machine.mixed_precision} mixed precision not modelled)")
    extras = ", activation checkpointing" if machine.grad_checkpointing else ""
    return (f"memory: about {format_bytes(need)} for the training step (model, optimizer, activations at batch "
            f"{p.batch_size}, precision {precision}{extras})")


def build_model(p: Params, classes: list[str], resize: str, image_shape: tuple[int, int],
                pretrained: MlpMixer | None) -> MlpMixer:
    """A fresh Mixer from the params, initialised from `seed`, or the loaded `checkpoint` (mixer.pretrained)."""
    torch.manual_seed(p.seed)  # the initialisation (and a new head's): the same on every rank and every run
    if pretrained is None:
        return MlpMixer(architecture(p, len(classes), image_shape), classes, Preprocessing(resize))
    model = adapt_for_finetuning(at_image_shape(pretrained, image_shape).train(), p, classes)
    model.preprocessing = replace(model.preprocessing, resize=resize)  # the weights' normalisation, our resize
    return model


def adapt_for_finetuning(model: MlpMixer, p: Params, classes: list[str]) -> MlpMixer:
    """Keep the checkpoint's architecture (saying where the params differ); a new head for another label set."""
    have = model.config
    for key in ("patch_shape", "depth", "dim", "token_hidden", "channel_hidden"):
        if getattr(p, key) is not None and getattr(p, key) != getattr(have, key) and p.variant is None:
            print(f"note: {key} = {getattr(have, key)} from checkpoint {shown(p.checkpoint)} "
                  f"(params say {getattr(p, key)})")
    if model.class_names != classes:
        print(f"note: new zero-initialised head for {len(classes)} classes (checkpoint has {have.num_classes})")
        model.reset_head(classes)
    return model


def fingerprint(p: Params, prepared: Prepared, model: MlpMixer) -> dict:
    """What decides the result of a run: the params that do, the prepared data, the starting weights."""
    values = {k: getattr(p, k) for k in fingerprint_keys()}
    values = {k: list(v) if isinstance(v, tuple) else v for (k, v) in values.items()}
    values["prepared_data"] = prepared.data_hash
    if model.source is not None:
        values["checkpoint_weights"] = model.source["sha256"]
    return values


def trained_on(p: Params, prepared: Prepared) -> dict:
    """The model's record of its training data: the prepared hash (which covers the split) and the split's
    parameters, from the cache's own record where it has one (an override of `mixer prepare` is there)."""
    split = prepared.split_params or {"seed": p.seed, "val_fraction": p.val_fraction, "test_fraction": p.test_fraction}
    return {"prepared_data": prepared.data_hash, **split}


def run_dir(output_dir: str) -> Path:
    """checkpoints/<output_dir>: the folder of the runs that write `output_dir`, one sub-folder each
    (mixer.train_state.run_folder)."""
    path = Path(os.path.normpath(output_dir))
    if path.is_absolute() or path.parts[:1] in ((), ("..",)):  # outside the project, or it: a name of its own
        path = Path(f"{path.name}-{hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:10]}")
    return CHECKPOINTS / path


def check_prepared(p: Params, prepared: Prepared, image_shape: tuple[int, int]) -> None:
    """The prepared data must be what the params describe; else prepare is stale."""
    again = "run `mixer prepare` (or `dvc repro`) again"
    if p.num_classes is not None and p.num_classes != len(prepared.classes):
        raise MixerError(f"num_classes is {p.num_classes} but {PREPARED} holds {len(prepared.classes)} classes; {again}")
    if prepared.image_shape != image_shape:
        raise MixerError(f"image_shape is {list(image_shape)} but {PREPARED} holds "
                         f"{list(prepared.image_shape)} images; {again}")
    if prepared.resize != p.resize:
        raise MixerError(f"resize is {p.resize} but {PREPARED} was made with {prepared.resize}; {again}")


class LiveReporter(ConsoleReporter):
    """The console, plus dvclive's per-epoch metrics (rebuilt from the checkpoint after a resume)."""

    def __init__(self, directory: Path, p: Params, bar: bool | None):
        from dvclive import Live

        super().__init__(bar)
        self.live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
        self.live.log_params({k: list(v) if isinstance(v, tuple) else v for (k, v) in p.for_stage("train").items()})

    def start(self, state: TrainState, epochs: int, steps_per_epoch: int) -> None:
        for metrics in state.history:  # each epoch once, whether it ran now or before a kill
            self.log(metrics)
        super().start(state, epochs, steps_per_epoch)

    def epoch(self, metrics: dict) -> None:
        self.log(metrics)
        super().epoch(metrics)

    def log(self, metrics: dict) -> None:
        self.live.step = metrics["epoch"] - 1
        for (key, value) in metrics.items():
            if key != "epoch":
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self) -> None:
        self.live.end()


class Stopped(Exception):
    """Training stopped on a signal, after writing a checkpoint; the CLI exits with 128 + `signum`, as a
    shell does for a command the signal killed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Stop(threading.Event):
    """Set by SIGTERM or SIGINT; remembers which."""

    signum: int = 0


@contextmanager
def stop_on_signals() -> Iterator[Stop]:
    """While training, SIGTERM and SIGINT ask for a checkpoint and a stop.

    A second Ctrl-C stops at once; a second SIGTERM changes nothing (a preempted machine, or DVC
    dying beside us, may send several; the grace period ends with SIGKILL anyway).
    """
    stop = Stop()

    def handler(signum, frame):
        if stop.is_set():
            if signum == signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        stop.signum = signum
        stop.set()
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint{again}",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield stop
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for (s, h) in previous.items():
            signal.signal(s, h)


def plan(p: Params) -> Plan:
    """What `mixer train` writes and reads (checked by `mixer check` too; see pipeline.outputs).

    The starting weights are an input, so a checkpoint inside output_dir or the run's own folder
    (which the run overwrites) is refused: after a kill the same command would start from other weights.
    """
    checkpoint = Path(p.checkpoint) if p.checkpoint is not None and not is_remote(p.checkpoint) else None
    return Plan(targets=(Target(Path(p.output_dir), MODEL, "output_dir"), Target(TRAIN_LOG, LOG),
                         Target(run_dir(p.output_dir), RUN)),
                inputs=(PREPARED,) + ((checkpoint,) if checkpoint is not None else ()),
                places=tuple(project_places([Path(p.dataset)] if p.dataset != "digits" else [])))


def writable_folder(path: Path) -> None:
    """Create `path` and prove a file can be written there, before any training."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}.tmp"  # a temporary the run folder's kind allows
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise MixerError(f"cannot write checkpoints to {path}: {exc.strerror}") from None


def run(params_file: Path, overrides: dict, machine: Machine, resume: bool | None, bar: bool | None) -> dict:
    p = load_params(params_file, overrides)
    launched = processes()  # the one decision of which process writes; the engine's Accelerator agrees
    main = launched.main
    if main:  # before any work: the outputs are ones this command may replace
        plan(p).verify()
    prepared = open_prepared(PREPARED)
    pretrained = load_pretrained(p.checkpoint) if p.checkpoint is not None else None  # loaded once
    image_shape = input_shape(p, pretrained.config if pretrained is not None else None)
    check_prepared(p, prepared, image_shape)
    # before the model is built (it alone may not fit); the ranks on this machine share its RAM
    need = check_memory(p, model_config(p, len(prepared.classes), pretrained and pretrained.config),
                        launched.local_world, machine.grad_checkpointing)
    model = build_model(p, prepared.classes, prepared.resize, image_shape, pretrained)
    train_split, val_split = prepared.split("train"), prepared.split("val")
    config = train_config(p)
    spe = steps_per_epoch(len(train_split), config, launched.world)  # before touching any file
    folder = run_dir(p.output_dir)
    outputs = writing("mixer train", plan(p)) if main else nullcontext()
    with outputs as staging, stop_on_signals() as stop:
        reporter = None
        if main:
            model_dir, live_dir = staging.dir(Path(p.output_dir)), staging.dir(TRAIN_LOG)
            writable_folder(folder)
            reporter = LiveReporter(live_dir, p, bar)
            reporter.line(memory_line(need, p, machine))
            for line in notes(p):  # once nothing stands in the way: a failing command prints its error alone
                reporter.line(line)
            step_images = config.batch_size * config.grad_accum * launched.world
            reporter.line(f"training: {config.epochs} epochs of {spe} steps × {step_images} images "
                          f"({spe * step_images} of the {len(train_split)} training images an epoch), "
                          f"{len(val_split)} val images scored after each")
            if p.keep == "best" and len(val_split) < SMALL_VAL:
                reporter.line(f"note: keep: best picks an epoch by {len(val_split)} val images, where one image is "
                              f"{100 / len(val_split):.2f} points of accuracy: epochs that close are noise, and on the "
                              "digits the last epoch beat the best one 7 of 10 times (benchmarks/recipe.py); "
                              "keep: last is the default")
        stop_when_dvc_dies()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        record = dict(source=None if model.source is None else {"fine_tuned_from": model.source},
                      trained_on=trained_on(p, prepared),  # on every model the run writes: best/ too
                      environment=environment(launched.world, device, machine.mixed_precision))
        try:
            result = train(model, train_split, val_split, config, model.preprocessing, folder,
                           fingerprint(p, prepared, model), replace(machine, stop=stop), resume, reporter, record)
            if main:
                save_model(result.model, model_dir, kept=result.kept, **record)
                reporter.end()
        except Interrupted as exc:
            raise Stopped(str(exc), stop.signum) from None
        finally:
            if reporter is not None:
                reporter.close()
    return result.metrics
