"""params.yaml → one frozen, validated `Params`; the only place that reads the file.

Every key is a field here, with its type, its help and the stages that use it. Loading checks
everything up front; a bad value raises `MixerError` naming the key, which the CLI prints as one
line with exit code 2 before any work is done or anything is overwritten.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from mixer.errors import MixerError
from mixer.model import VARIANTS, MixerConfig
from mixer.preprocess import RESIZE_POLICIES
from mixer.pretrained import pretrained_config
from mixer.text import shown

PARAMS_FILE = Path("params.yaml")


def _p(default, help: str, stages: str, original=None):
    """A params field: its default (the committed params.yaml's), help, and the stages that read it."""
    # Runs at import only, before any mutant can be switched on: mutating it tests nothing.
    meta = {"help": help, "stages": tuple(stages.split()), "original": original}  # pragma: no mutate
    return field(default=default, metadata=meta)  # pragma: no mutate


@dataclass(frozen=True)
class Params:
    # data
    data: str = _p("digits", "data source: 'digits' (embedded) or an image folder", "prepare")
    seed: int = _p(0, "seed for the split, initialisation, shuffling and augmentation", "prepare train")
    val_fraction: float = _p(0.1, "share of each class held out for validation", "prepare")
    test_fraction: float = _p(0.2, "share of each class held out for the test", "prepare")
    resize: str = _p("stretch", "stretch to image_shape, or center_crop after resizing the shorter side",
                     "prepare")
    strict: bool = _p(False, "stop at an undecodable image instead of skipping and reporting it", "prepare")
    drop_duplicates: bool = _p(True, "drop images whose content already appears in an earlier split",
                               "prepare")
    # the 14 options of the original train.py, same names
    image_shape: tuple[int, int] = _p((12, 12), "input height and width", "prepare train", (256, 256))
    patch_shape: tuple[int, int] = _p((3, 3), "patch height and width", "train", (16, 16))
    depth: int = _p(4, "number of Mixer blocks", "train", 6)
    dim: int = _p(128, "channels C (hidden width of each patch)", "train", 512)
    num_classes: int | None = _p(10, "number of classes (null: from the data)", "prepare train", 120)
    checkpoint: str | None = _p(None, "weights to fine-tune: a model directory, a weights file, "
                                "hf-hub:owner/name[@revision] or an https:// URL; its input size wins "
                                "over image_shape", "prepare train", None)
    freeze: str = _p("none", "none: train every weight; features: train only the head (a linear probe of "
                     "the checkpoint's features)", "train")
    output_dir: str = _p("output", "where the trained model is written", "train evaluate", "output/")
    batch_size: int = _p(64, "images per optimizer step and process", "train", 16)
    lr: float = _p(3.0e-3, "peak learning rate", "train", 1.0e-3)
    momentum: float = _p(0.9, "SGD momentum (also AdamW's beta1)", "train", 0.9)
    decay: float = _p(0.05, "weight decay (not applied to norms and biases)", "train", 0.0)
    num_steps: int = _p(40, "training epochs", "train", 30)
    warmup_step: int = _p(3, "linear warm-up epochs", "train", 10)
    scheduler: str = _p("cosine", "decay after warm-up: cosine or linear", "train", "cosine")
    # architecture beyond the original flags
    variant: str | None = _p(None, f"paper variant ({' '.join(VARIANTS)}): sets patch_shape, depth, dim "
                             "and the hidden widths; token_hidden/channel_hidden still apply", "train")
    token_hidden: int | None = _p(None, "token-mixing hidden width D_S (null: dim/2)", "train")
    channel_hidden: int | None = _p(None, "channel-mixing hidden width D_C (null: 4*dim)", "train")
    dropout: float = _p(0.0, "dropout inside the MLPs", "train")
    drop_path: float = _p(0.0, "stochastic depth rate of the last block", "train")
    # optimisation
    optimizer: str = _p("adamw", "sgd (with momentum) or adamw (betas momentum, 0.999)", "train", "sgd")
    min_lr: float = _p(0.0, "learning-rate floor at the end of the decay", "train")
    clip_grad: float = _p(1.0, "clip gradients to this global norm (0: off)", "train")
    label_smoothing: float = _p(0.0, "label smoothing of the cross-entropy", "train")
    grad_accum: int = _p(1, "micro-batches accumulated per optimizer step", "train")
    ema_decay: float = _p(0.0, "EMA of weights per step (0: off); the EMA is evaluated and saved", "train")
    # augmentation (train only, on the training device)
    hflip: float = _p(0.0, "probability of a horizontal flip", "train")
    crop_scale: tuple[float, float] = _p((0.6, 1.0), "random resized crop area range ([1, 1]: off)",
                                         "train")
    crop_ratio: tuple[float, float] = _p((0.8, 1.25), "random resized crop aspect range", "train")
    randaugment_n: int = _p(0, "RandAugment: operations per image (0: off)", "train")
    randaugment_m: int = _p(9, "RandAugment: magnitude 0..30", "train")
    mixup: float = _p(0.0, "mixup alpha (0: off)", "train")
    cutmix: float = _p(0.0, "cutmix alpha (0: off)", "train")
    # evaluation
    eval_batch_size: int = _p(256, "images per batch when evaluating", "train evaluate")

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name)))
        _validate(self)

    def for_stage(self, stage: str) -> dict:
        """The params a stage reads, as plain values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if stage in f.metadata["stages"]}


def stage_keys(stage: str) -> list[str]:
    """Names of the params a stage reads (what dvc.yaml lists for it); `check` reads them all."""
    return [f.name for f in fields(Params) if stage in f.metadata["stages"] or stage == "check"]


def input_shape(p: Params, checkpoint_config: MixerConfig | None = None) -> tuple[int, int]:
    """The images' size: `image_shape`, or when fine-tuning the checkpoint's (its token-mixing
    weights are tied to its patch grid, so no other size fits it). `checkpoint_config`: the
    checkpoint's architecture when the caller has already loaded it."""
    if p.checkpoint is None:
        return p.image_shape
    shape = (checkpoint_config or pretrained_config(p.checkpoint)).image_shape
    if shape != p.image_shape:
        print(f"note: image_shape {list(shape)} from checkpoint {shown(p.checkpoint)} "
              f"(params say {list(p.image_shape)})")
    return shape


def field_info(name: str) -> dict:
    return next(f for f in fields(Params) if f.name == name).metadata


@functools.cache
def _field_types() -> dict:
    """Each field's type (the annotations are strings until resolved, once)."""
    return typing.get_type_hints(Params)


def _check(key: str, value):
    """Coerce `value` to the field's type or raise a one-line error naming the key."""
    kind = _field_types()[key]
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise MixerError(f"{key} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_scalar(f"{key}[{i}]", v, t) for (i, (v, t)) in enumerate(zip(value, args)))
    return _scalar(key, value, kind)


def _scalar(key: str, value, kind):
    if kind is bool:
        if not isinstance(value, bool):
            raise MixerError(f"{key} must be true or false, got {value!r}")
        return value
    if kind in (int, float) and isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        raise MixerError(f"{key}: YAML reads {value!r} as a string; write it with a decimal point, "
                         f"e.g. {float(value):.1e}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MixerError(f"{key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MixerError(f"{key} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value:
        raise MixerError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _validate(p: Params) -> None:
    def need(ok: bool, message: str):
        if not ok:
            raise MixerError(message)

    for key in ("depth", "dim", "batch_size", "eval_batch_size", "num_steps", "grad_accum"):
        need(getattr(p, key) >= 1, f"{key} must be at least 1, got {getattr(p, key)}")
    need(p.num_classes is None or p.num_classes >= 2, f"num_classes must be at least 2 or null, got {p.num_classes}")
    for key in ("token_hidden", "channel_hidden"):
        need(getattr(p, key) is None or getattr(p, key) >= 1, f"{key} must be at least 1 or null")
    need(all(v >= 1 for v in p.image_shape), f"image_shape must be positive, got {list(p.image_shape)}")
    need(all(v >= 1 for v in p.patch_shape), f"patch_shape must be positive, got {list(p.patch_shape)}")
    if p.variant is None and p.checkpoint is None:  # a checkpoint brings its own input size and patches
        need(p.image_shape[0] % p.patch_shape[0] == 0 and p.image_shape[1] % p.patch_shape[1] == 0,
             f"image_shape {list(p.image_shape)} is not divisible by patch_shape {list(p.patch_shape)}")
    if p.variant is not None:
        need(p.variant in VARIANTS, f"variant must be one of {' '.join(VARIANTS)} or null, got {p.variant!r}")
    need(p.warmup_step >= 0, f"warmup_step must be 0 or more, got {p.warmup_step}")
    need(p.scheduler in ("cosine", "linear"), f"scheduler must be 'cosine' or 'linear', got {p.scheduler!r}")
    need(p.freeze in ("none", "features"), f"freeze must be 'none' or 'features', got {p.freeze!r}")
    need(p.freeze == "none" or p.checkpoint is not None,
         "freeze: features trains only the head, so it needs a checkpoint to take the features from")
    need(p.optimizer in ("sgd", "adamw"), f"optimizer must be 'sgd' or 'adamw', got {p.optimizer!r}")
    need(p.resize in RESIZE_POLICIES, f"resize must be {' or '.join(map(repr, RESIZE_POLICIES))}, got {p.resize!r}")
    need(0 <= p.seed < 2**32, f"seed must be in 0 .. 2**32 - 1, got {p.seed}")
    need(p.lr > 0, f"lr must be positive, got {p.lr}")
    need(0 <= p.min_lr <= p.lr, f"min_lr must be between 0 and lr ({p.lr}), got {p.min_lr}")
    need(0 <= p.momentum < 1, f"momentum must be in [0, 1), got {p.momentum}")
    for key in ("decay", "clip_grad", "mixup", "cutmix"):
        need(getattr(p, key) >= 0, f"{key} must be 0 or more, got {getattr(p, key)}")
    for key in ("label_smoothing", "dropout", "drop_path", "hflip", "ema_decay"):
        need(0 <= getattr(p, key) < 1 or (key == "hflip" and p.hflip == 1),
             f"{key} must be in [0, 1), got {getattr(p, key)}")
    need(0 < p.val_fraction < 1 and 0 < p.test_fraction < 1 and p.val_fraction + p.test_fraction < 1,
         f"val_fraction + test_fraction must leave a training share, got {p.val_fraction} + {p.test_fraction}")
    lo, hi = p.crop_scale
    need(0 < lo <= hi <= 1, f"crop_scale must satisfy 0 < low <= high <= 1, got {list(p.crop_scale)}")
    lo, hi = p.crop_ratio
    need(0 < lo <= hi, f"crop_ratio must satisfy 0 < low <= high, got {list(p.crop_ratio)}")
    need(p.randaugment_n >= 0, f"randaugment_n must be 0 or more, got {p.randaugment_n}")
    need(0 <= p.randaugment_m <= 30, f"randaugment_m must be in 0..30, got {p.randaugment_m}")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice is an error instead of the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for (key_node, _) in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {first[key]})", key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class says so
                pass
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> object:
    """A YAML file's content; a one-line error naming the file (and line) when it cannot be had."""
    if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or a device would block or never end
        raise MixerError(f"{path} is not a regular file; give a params file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise MixerError(f"params file {path} does not exist") from None
    except IsADirectoryError:
        raise MixerError(f"{path} is a folder; give a params file") from None
    except OSError as exc:
        raise MixerError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise MixerError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MixerError(f"{path}{where}: not valid YAML ({problem})") from None


def load_params(path: Path = PARAMS_FILE, overrides: dict | None = None) -> Params:
    """Read and validate a params file; `overrides` (key → value) win for this run only."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise MixerError(f"{path} must be a mapping of keys to values")
    known = {f.name for f in fields(Params)}
    unknown = sorted(map(str, set(raw) - known))
    if unknown:
        raise MixerError(f"{path}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else ""))
    missing = sorted(known - set(raw))
    if missing:
        raise MixerError(f"{path}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
    raw.update({k: v for (k, v) in (overrides or {}).items() if v is not None})
    try:
        return Params(**raw)
    except MixerError as exc:
        raise MixerError(f"{path}: {exc}") from None
