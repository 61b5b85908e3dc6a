"""Model directories (`model.safetensors` + `config.json`) and weight import; nothing is unpickled.

A model directory is what training writes and what evaluation, predict, export and fine-tuning read.
`import_weights` converts the two public layouts (timm's `MlpMixer` state dict, the official
vit_jax `.npz`) into one, inferring the architecture from the tensor shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mixer.errors import MixerError
from mixer.model import MixerConfig, MlpMixer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "mlp-mixer"
DEFAULT_MEAN = (0.5, 0.5, 0.5)  # the normalisation of the paper's and timm's Mixer weights
DEFAULT_STD = (0.5, 0.5, 0.5)


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)`, then rename over `path`: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(model: MlpMixer, directory: Path, class_names: list[str] | None = None,
               mean: tuple = DEFAULT_MEAN, std: tuple = DEFAULT_STD, resize: str = "stretch") -> None:
    """Write `model.safetensors` and `config.json` (architecture, classes, normalisation) atomically."""
    directory = Path(directory)
    cfg = model.config
    names = list(class_names) if class_names is not None else [str(i) for i in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise MixerError(f"{len(names)} class names for a model with {cfg.num_classes} classes")
    tensors = {k: v.detach().to("cpu").contiguous() for (k, v) in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "architecture": cfg.to_dict(),
        "class_names": names,
        "normalization": {"mean": list(mean), "std": list(std)},
        "image_shape": list(cfg.image_shape),
        "resize": resize,
    }
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))


def read_config(directory: Path) -> dict:
    """The parsed `config.json` of a model directory, checked for the keys this project needs."""
    path = Path(directory) / CONFIG
    if not Path(directory).is_dir():
        raise MixerError(f"model directory {directory} does not exist")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise MixerError(f"{path} is missing: not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MixerError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "architecture" not in meta:
        raise MixerError(f"{path} is not an MLP-Mixer config (no format: {FORMAT!r} and architecture)")
    return meta


def load_model(directory: Path, device: str | torch.device = "cpu") -> MlpMixer:
    """Load a model directory, ready for inference (eval mode); `.meta` holds its config.json."""
    meta = read_config(directory)
    try:
        config = MixerConfig.from_dict(meta["architecture"])
    except TypeError as exc:
        raise MixerError(f"{Path(directory) / CONFIG}: bad architecture ({exc})") from None
    model = MlpMixer(config)
    load_state(model, read_tensors(Path(directory) / WEIGHTS), Path(directory) / WEIGHTS)
    model.meta = meta
    return model.to(device).eval()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, `.pth`/`.bin` (weights only, never unpickling code) or `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise MixerError(f"{path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise MixerError(f"{path} is not a readable weights file ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # weights_only refuses pickled code with an UnpicklingError
        if type(exc).__name__ == "UnpicklingError":
            raise MixerError(f"{path} holds more than tensors; refusing to unpickle it") from None
        raise
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MixerError(f"{path} is not a state dict of tensors")
    return state


def load_state(model: MlpMixer, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy `state` into `model`, refusing missing, extra or mis-shaped tensors with one message."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for (k, v) in expected.items()
             if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {_few(missing)}")
    if extra:
        problems.append(f"unexpected {_few(extra)}")
    if wrong:
        problems.append(f"wrong shape {_few(wrong)}")
    if problems:
        raise MixerError(f"{source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# ---- import from public layouts -------------------------------------------------------------

_TIMM = [
    (r"stem\.proj\.(weight|bias)", r"stem.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.token_norm.\2"),
    (r"blocks\.(\d+)\.mlp_tokens\.(fc[12])\.(weight|bias)", r"blocks.\1.token_mlp.\2.\3"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.channel_norm.\2"),
    (r"blocks\.(\d+)\.mlp_channels\.(fc[12])\.(weight|bias)", r"blocks.\1.channel_mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"norm.\1"),
    (r"head\.(weight|bias)", r"head.\1"),
]
_JAX_PARAM = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_JAX = [
    (r"stem/(kernel|bias)", "stem"),
    (r"MixerBlock_(\d+)/LayerNorm_0/(scale|bias)", "blocks.{0}.token_norm"),
    (r"MixerBlock_(\d+)/token_mixing/Dense_([01])/(kernel|bias)", "blocks.{0}.token_mlp.fc{1}"),
    (r"MixerBlock_(\d+)/LayerNorm_1/(scale|bias)", "blocks.{0}.channel_norm"),
    (r"MixerBlock_(\d+)/channel_mixing/Dense_([01])/(kernel|bias)", "blocks.{0}.channel_mlp.fc{1}"),
    (r"pre_head_layer_norm/(scale|bias)", "norm"),
    (r"head/(kernel|bias)", "head"),
]


def _rename(state: dict[str, torch.Tensor], rules, convert, source: Path) -> dict[str, torch.Tensor]:
    out = {}
    for (name, tensor) in state.items():
        for (pattern, target) in rules:
            m = re.fullmatch(pattern, name)
            if m:
                key, value = convert(m, target, tensor)
                out[key] = value
                break
        else:
            raise MixerError(f"{source}: unexpected tensor {name!r} for this layout")
    return out


def _from_timm(state: dict, source: Path) -> dict:
    def convert(m, target, tensor):
        return m.expand(target), tensor.float()
    return _rename(state, _TIMM, convert, source)


def _from_jax(state: dict, source: Path) -> dict:
    def convert(m, target, tensor):
        groups = m.groups()
        param = _JAX_PARAM[groups[-1]]
        if groups[-1] == "kernel":
            # Flax stores Dense kernels (in, out) and Conv kernels HWIO; PyTorch wants (out, in) / OIHW.
            tensor = tensor.permute(3, 2, 0, 1) if tensor.dim() == 4 else tensor.t()
        int_groups = [int(g) for g in groups[:-1]]
        if "/Dense_" in m.string:
            int_groups[1] += 1  # Flax's Dense_0/Dense_1 are this project's fc1/fc2
        return f"{target.format(*int_groups)}.{param}", tensor.float().contiguous()
    return _rename({k.lstrip("/").removeprefix("params/"): v for (k, v) in state.items()}, _JAX, convert, source)


def infer_config(state: dict[str, torch.Tensor], gelu: str,
                 image_shape: tuple[int, int] | None = None) -> MixerConfig:
    """The architecture that a state dict in this project's names implies."""
    try:
        stem = state["stem.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        token_fc1 = state["blocks.0.token_mlp.fc1.weight"]
        channel_fc1 = state["blocks.0.channel_mlp.fc1.weight"]
        head = state["head.weight"]
    except (KeyError, ValueError) as exc:
        raise MixerError(f"not an MLP-Mixer checkpoint: no tensor {exc}") from None
    dim, in_chans, ph, pw = stem.shape
    token_hidden, num_patches = token_fc1.shape
    if image_shape is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise MixerError(f"{num_patches} patches is not a square grid: give the image shape")
        image_shape = (side * ph, side * pw)
    return MixerConfig(image_shape=tuple(image_shape), patch_shape=(ph, pw), depth=depth, dim=dim,
                       token_hidden=token_hidden, channel_hidden=channel_fc1.shape[0],
                       num_classes=head.shape[0], in_chans=in_chans, gelu=gelu)


def import_weights(source: Path, out_dir: Path, image_shape: tuple[int, int] | None = None,
                   class_names: list[str] | None = None) -> MlpMixer:
    """Convert a timm state dict or a vit_jax `.npz` into a model directory; returns the model."""
    source = Path(source)
    raw = read_tensors(source)
    if any(k.startswith(("stem/", "MixerBlock_", "/stem", "params/")) for k in raw):
        state, gelu = _from_jax(raw, source), "tanh"  # the official code uses GELU's tanh form
    elif "stem.proj.weight" in raw:
        state, gelu = _from_timm(raw, source), "exact"
    elif "stem.weight" in raw:
        state, gelu = dict(raw), "exact"  # already this project's names
    else:
        raise MixerError(f"{source} is neither a timm MlpMixer nor a vit_jax Mixer checkpoint")
    model = MlpMixer(infer_config(state, gelu, image_shape))
    load_state(model, state, source)
    save_model(model, Path(out_dir), class_names)
    return model
