"""The `mixer` command: one sub-command per stage, each reading params.yaml with per-run overrides.

Every params key that a stage reads is also an option of its command, under Typer's spelling
(`--image-shape 256 256`) and the original train.py's (`--image_shape 256 256`). Overrides apply to
this run only; params.yaml is never written. A user error prints one line and exits with code 2.
"""

from __future__ import annotations

import functools
import inspect
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from mixer.errors import MixerError
from mixer.launch import is_main
from mixer.text import clipped, one_line, param_text, shown
from pipeline.allocator import keep_freed_memory
from pipeline.params import KEYS, PARAMS_FILE, RENAMED, STAGES, stage_keys

app = typer.Typer(help="Train MLP-Mixer image classifiers as a reproducible DVC pipeline.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, rich_markup_mode="rich")

ParamsOption = Annotated[Path, typer.Option("--params", help="params file to read (a preset works too)")]


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (code 2)."""
    # Every MixerError ends here, and its message names paths, class names or URLs from outside:
    # escaped, so they cannot drive the terminal, and a line break in one keeps the error on one line.
    if is_main():  # launched processes fail alike: rank 0 says it once
        typer.echo(f"error: {one_line(message)}", err=True)
    return typer.Exit(2)


def failed_os_call(exc: OSError) -> typer.Exit:
    """An OSError no check turned into a MixerError (a path part over 255 bytes, a permission) as one line
    naming the path: an input problem never ends in a traceback."""
    where = exc.filename if exc.filename is not None else "a file"
    path = os.fsdecode(where) if isinstance(where, (str, bytes, os.PathLike)) else str(where)
    return fail(f"{clipped(path)}: {exc.strerror or type(exc).__name__}")


def _override_parameter(name: str, stage: str) -> inspect.Parameter:
    """A keyword option for params key `name`, under both spellings, defaulting to 'not given'."""
    key = KEYS[name]
    kind = key.base  # without None: Typer's type
    if key.nullable:  # read as text, so that `null` can be given (see `_nullable_value`)
        kind = str
    text = key.declaration.help + (" [dim](null: none)[/dim]" if key.nullable else "")
    if key.declaration.original is not None:
        text += f" [dim](original train.py: {param_text(key.declaration.original, command_line=True)})[/dim]"
    decls = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    decls += [f"--{old}" for (old, new) in RENAMED.items() if new == name]  # the key's old name still works
    if kind is bool:
        decls = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
    reads = name in stage_keys(stage)
    option = typer.Option(*decls, help=text, rich_help_panel=f"params.yaml keys the {stage} stage reads (override "
                          "for this run)", show_default=False, hidden=not reads)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


def _nullable_value(name: str, text: str):
    """A nullable key's option: `null` (or `none`) is None, anything else its type's value."""
    if text.lower() in ("null", "none", "~"):
        return None
    kind = KEYS[name].base
    try:
        return kind(text)
    except ValueError:
        raise MixerError(f"--{name.replace('_', '-')} must be {'an integer' if kind is int else 'a ' + kind.__name__} "
                         f"or null, got {text!r}") from None


def _given(stage: str, given: dict) -> dict:
    """The overrides of a command's key options: each as its key's value; a key the stage does not read
    is an error naming the command that does (it would do nothing here)."""
    for name in given:
        if stage != "check" and name not in stage_keys(stage):
            reader = next(s for s in STAGES if name in stage_keys(s))
            raise MixerError(f"--{name.replace('_', '-')} is read by `mixer {reader}`, not `mixer {stage}`: run "
                             f"`mixer {reader} --{name.replace('_', '-')} ...` (or set {name} in params.yaml and "
                             "run dvc repro)")
    return {k: _nullable_value(k, v) if KEYS[k].nullable else v for (k, v) in given.items()}


def stage_command(stage: str, name: str | None = None):
    """Register a command whose options include every params key as an override, the stage's first.

    The decorated function takes `overrides` (key → value given on the command line) plus its own
    options; a `MixerError` anywhere below becomes one line on stderr and exit code 2.
    """
    keys = stage_keys(stage) + [k for k in KEYS if k not in stage_keys(stage)]

    def decorate(func):
        hints = typing.get_type_hints(func, include_extras=True)  # evaluated: Typer reads help and envvar there
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(func).parameters.values()
               if p.name != "overrides"]

        @functools.wraps(func)
        def command(**kwargs):
            overrides = {k: kwargs.pop(k) for k in keys}
            try:
                return func(overrides=_given(stage, {k: v for (k, v) in overrides.items() if v is not None}), **kwargs)
            except MixerError as exc:
                raise fail(str(exc)) from None
            except OSError as exc:
                raise failed_os_call(exc) from None

        params = own + [_override_parameter(k, stage) for k in keys]
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name or func.__name__)(command)

    return decorate


def guarded(func):
    """For commands without params overrides: MixerError → one line, exit code 2."""

    @functools.wraps(func)
    def command(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MixerError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise failed_os_call(exc) from None

    return command


@stage_command("check")
def check(overrides: dict, params: ParamsOption = PARAMS_FILE) -> None:
    """Validate params.yaml and the paths it names; the pipeline's first stage."""
    from pipeline import check as stage

    stage.run(params, overrides)


@stage_command("prepare")
def prepare(overrides: dict, params: ParamsOption = PARAMS_FILE,
            workers: Annotated[int, typer.Option(help="decoding processes (a machine setting)")] = 2) -> None:
    """Decode the data source, resize, split (train/val/test) and cache it under prepared/."""
    from pipeline import prepare as stage

    stage.run(params, overrides, workers)


@stage_command("train")
def train(overrides: dict, params: ParamsOption = PARAMS_FILE,
          resume: Annotated[Optional[bool], typer.Option(
              "--resume/--no-resume",
              help="--resume: continue this run's checkpoint (another run's is an error); --no-resume: start "
                   "over. Default: continue when checkpoints/<output_dir> holds this run, else start over")] = None,
          checkpoint_every: Annotated[str, typer.Option(
              envvar="MIXER_CHECKPOINT_EVERY",
              help="also checkpoint inside epochs: optimizer steps (500) or a time (90s, 10m, 2h)")] = "10m",
          mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (keep 'no' on CPU)")] = "no",
          compile: Annotated[bool, typer.Option(help="torch.compile the model")] = False,
          grad_checkpointing: Annotated[bool, typer.Option(
              "--grad-checkpointing/--no-grad-checkpointing",
              help="recompute each block's activations in the backward: less memory (one block's activations "
                   "at a time), about a third more compute; the same result")] = False,
          progress: Annotated[Optional[bool], typer.Option(help="progress bar (default: on a terminal)")] = None,
          log_every: Annotated[int, typer.Option(
              help="optimizer steps between reads of the running loss; several processes also agree on a stop "
                   "or a due checkpoint only then (each read waits for the device)")] = 50,
          ) -> None:
    """Train the Mixer with Accelerate; writes output_dir/ (model.safetensors, config.json) and reports/train/.

    SIGTERM or Ctrl-C: the current step finishes (with several processes: the next of every
    --log-every steps), a checkpoint is written, and the command exits; running it again (or
    `dvc repro`) continues from there.
    """
    from mixer.engine import Machine
    from mixer.train_state import Every
    from pipeline import train as stage

    if log_every < 1:
        raise fail(f"--log-every must be at least 1, got {log_every}")
    try:
        machine = Machine(mixed_precision, compile, Every.parse(checkpoint_every), log_every=log_every,
                          grad_checkpointing=grad_checkpointing)
        stage.run(params, overrides, machine, resume, progress)
    except stage.Stopped as exc:
        signum = exc.signum
        name = signal.Signals(signum).name if signum else "request"
        # every rank says it: which one the signal reached, and that all stopped at the same step
        typer.echo(f"stopped by {name}: {shown(exc)}; run the same command (or dvc repro) to continue", err=True)
        raise typer.Exit(128 + signum) from None


@stage_command("evaluate")
def evaluate(overrides: dict, params: ParamsOption = PARAMS_FILE,
             other_data: Annotated[bool, typer.Option(
                 "--other-data", help="score prepared/ even if the model was trained on other data or another "
                                      "split (its test split may then hold training images)")] = False) -> None:
    """Score the trained model on the test split and write reports/ (metrics, figures, README)."""
    from pipeline import evaluate as stage

    stage.run(params, overrides, other_data)


@app.command()
@guarded
def predict(paths: Annotated[list[Path], typer.Argument(help="images or folders of images")],
            model: Annotated[Optional[str], typer.Option(
                help="model directory (default: output_dir), weights file, hf-hub:owner/name[@rev] or https URL")
            ] = None,
            top_k: Annotated[int, typer.Option("--top-k", help="labels per image")] = 5,
            out: Annotated[Optional[Path], typer.Option(help="write the predictions to this file")] = None,
            format: Annotated[Optional[str], typer.Option(
                help="csv, or json (JSON Lines); default: what --out's name says (.json, .jsonl: json; else csv). "
                     "Without --out: the rows to standard output, in this format")] = None,
            workers: Annotated[int, typer.Option(
                help="decoding processes, at most one per image and CPU (a machine setting)")] = 2,
            params: ParamsOption = PARAMS_FILE) -> None:
    """Classify images with a trained model: top-k labels and probabilities per image.

    Predictions stream to --out as they are made; more than 20 images are summed up on the console.
    """
    from pipeline import predict as stage

    stage.run(paths, model, top_k, out, params, workers, format)


@app.command("import-weights")
@guarded
def import_weights(source: Annotated[str, typer.Argument(
                       help="hf-hub:owner/name[@revision], an https:// URL, or a file: timm .safetensors/.pth/.bin "
                            "or vit_jax .npz")],
                   out_dir: Annotated[Path, typer.Argument(help="model directory to write")],
                   image_shape: Annotated[Optional[tuple[int, int]], typer.Option(
                       "--image-shape", "--image_shape", help="input size: the weights' own (a bare file "
                       "whose grid is not square needs it) or a whole multiple per side (token mixing expanded)")] = None,
                   force: Annotated[bool, typer.Option(help="overwrite an existing model directory")] = False,
                   ) -> None:
    """Convert a public MLP-Mixer checkpoint into a model directory this tool trains and evaluates.

    From the hub, the repository's timm config.json sets the input size and normalisation; the
    directory's config.json records the source, the revision it resolved to and the file's sha256.
    """
    from pipeline import weights as stage

    c = stage.run(source, out_dir, image_shape, force).config
    typer.echo(f"wrote {shown(out_dir)}: {c.depth} blocks, dim {c.dim}, patch {list(c.patch_shape)}, "
               f"image {list(c.image_shape)}, {c.num_classes} classes, GELU {c.gelu}")


@app.command()
@guarded
def export(model: Annotated[Optional[Path], typer.Option(help="model directory (default: output_dir)")] = None,
           format: Annotated[str, typer.Option(help="onnx")] = "onnx",
           params: ParamsOption = PARAMS_FILE) -> None:
    """Export the model (ONNX, dynamic batch) next to its weights and check parity with PyTorch."""
    from pipeline import export as stage

    if format != "onnx":
        raise fail(f"--format must be onnx, got {format!r}")
    stage.run(model, params)


@app.command()
@guarded
def bench(config: Annotated[str, typer.Option(help="original, default, or both")] = "both",
          steps: Annotated[int, typer.Option(help="timed steps per measurement")] = 10,
          json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
          compile: Annotated[bool, typer.Option(help="also time torch.compile (reports warm-up)")] = False,
          scaling: Annotated[bool, typer.Option(help="instead: cost against patches and depth")] = False,
          params: ParamsOption = PARAMS_FILE) -> None:
    """Measure training/inference throughput, FLOP/s, MFU and data wait against a plain reference."""
    from pipeline import bench as stage

    if steps < 1:
        raise fail(f"--steps must be at least 1, got {steps}")
    if scaling:
        stage.scaling(steps, json_out)
    else:
        stage.run(config, steps, json_out, compile, params)


def leave_process_group() -> None:
    """Leave the process group a launched command joined (torchrun, accelerate launch), if any.

    A process that exits with its gloo group alive aborts in about one exit of four ("terminate called
    without an active exception", exit -6), and the launcher reports a failure after a run that succeeded.
    """
    dist = sys.modules.get("torch.distributed")  # loaded with torch; a command that never imported torch has none
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    keep_freed_memory()
    try:
        app()
    finally:
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
