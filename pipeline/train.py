"""Stage `train`: prepared/ → output_dir/ (model.safetensors, config.json, checkpoints/), reports/train/."""

from __future__ import annotations

from pathlib import Path

import torch

from mixer.augment import AugmentConfig
from mixer.checkpoint import load_model
from mixer.data import load_split
from mixer.engine import Machine, TrainConfig, train
from mixer.errors import MixerError
from mixer.model import MixerConfig, MlpMixer, create_model
from pipeline.params import Params, load_params
from pipeline.paths import PREPARED, TRAIN_LOG


def train_config(p: Params) -> TrainConfig:
    """The run's hyperparameters, from params.yaml names to the engine's."""
    return TrainConfig(
        epochs=p.num_steps, batch_size=p.batch_size, lr=p.lr, optimizer=p.optimizer, momentum=p.momentum,
        weight_decay=p.decay, warmup_epochs=p.warmup_step, scheduler=p.scheduler, min_lr=p.min_lr,
        clip_grad=p.clip_grad, label_smoothing=p.label_smoothing, grad_accum=p.grad_accum,
        ema_decay=p.ema_decay, seed=p.seed, eval_batch_size=p.eval_batch_size,
        augment=AugmentConfig(hflip=p.hflip, crop_scale=p.crop_scale, crop_ratio=p.crop_ratio,
                              randaugment_n=p.randaugment_n, randaugment_m=p.randaugment_m,
                              mixup=p.mixup, cutmix=p.cutmix),
    )


def build_model(p: Params, num_classes: int) -> MlpMixer:
    """A fresh Mixer from the params, or the `checkpoint` model directory to fine-tune."""
    fresh = dict(image_shape=p.image_shape, depth=p.depth, dim=p.dim, num_classes=num_classes,
                 token_hidden=p.token_hidden, channel_hidden=p.channel_hidden, dropout=p.dropout,
                 drop_path=p.drop_path)
    if p.variant is None:
        fresh["patch_shape"] = p.patch_shape
    else:  # the variant fixes patch, depth, dim and widths; explicit hidden widths still win
        fresh = {k: v for (k, v) in fresh.items() if k not in ("depth", "dim")}
    if p.checkpoint is None:
        return create_model(p.variant, **fresh)
    model = load_model(Path(p.checkpoint)).train()
    return adapt_for_finetuning(model, create_model(p.variant, **fresh).config, p.checkpoint)


def adapt_for_finetuning(model: MlpMixer, wanted: MixerConfig, source: str) -> MlpMixer:
    """Keep the checkpoint's architecture; replace the head for another label set."""
    have = model.config
    if have.image_shape != wanted.image_shape or have.patch_shape != wanted.patch_shape:
        raise MixerError(
            f"checkpoint {source} was trained on {list(have.image_shape)} images with patch "
            f"{list(have.patch_shape)} ({have.num_patches} patches); image_shape {list(wanted.image_shape)} with "
            f"patch_shape {list(wanted.patch_shape)} gives {wanted.num_patches}: token-mixing weights are tied "
            f"to the number of patches, so set image_shape and patch_shape to the checkpoint's")
    for key in ("depth", "dim", "token_hidden", "channel_hidden"):
        if getattr(have, key) != getattr(wanted, key):
            print(f"note: {key} = {getattr(have, key)} from checkpoint {source} "
                  f"(params say {getattr(wanted, key)})")
    if have.num_classes != wanted.num_classes:
        print(f"note: new zero-initialised head for {wanted.num_classes} classes "
              f"(checkpoint has {have.num_classes})")
        model.reset_head(wanted.num_classes)
    return model


def run(params_file: Path, overrides: dict, machine: Machine, resume: bool) -> dict:
    p = load_params(params_file, overrides)
    train_split, val_split = load_split(PREPARED, "train"), load_split(PREPARED, "val")
    classes = train_split.classes
    if p.num_classes is not None and p.num_classes != len(classes):
        raise MixerError(f"num_classes is {p.num_classes} but {PREPARED} holds {len(classes)} classes; "
                         "run `mixer prepare` again")
    if tuple(train_split.images.shape[1:3]) != p.image_shape:
        raise MixerError(f"image_shape is {list(p.image_shape)} but {PREPARED} holds "
                         f"{list(train_split.images.shape[1:3])} images; run `mixer prepare` again")
    torch.manual_seed(p.seed)  # the initialisation: the same on every rank and every run
    model = build_model(p, len(classes))
    config = train_config(p)
    live = _live(resume, p) if _is_main_process() else None

    def log(metrics: dict) -> None:
        live.step = metrics["epoch"] - 1  # after a resume, the epoch decides the step
        for (key, value) in metrics.items():
            if key != "epoch":
                live.log_metric(key, value)
        live.next_step()

    try:
        return train(model, train_split, val_split, config, Path(p.output_dir), machine, resume,
                     log if live else None, classes)
    finally:
        if live is not None:
            live.end()


def _live(resume: bool, p: Params):
    from dvclive import Live

    live = Live(dir=str(TRAIN_LOG), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
    live.log_params({k: list(v) if isinstance(v, tuple) else v for (k, v) in p.for_stage("train").items()})
    return live


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
