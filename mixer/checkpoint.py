"""Model directories (`model.safetensors` + `config.json`) and weight import; nothing is unpickled.

A model directory is what training writes and what evaluation, predict, export and fine-tuning read.
`convert_weights` reads the two public layouts (timm's `MlpMixer` state dict, the official vit_jax
`.npz`), inferring the architecture from the tensor shapes; `mixer.pretrained` fetches them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mixer.errors import MixerError
from mixer.files import atomic_write
from mixer.model import MixerConfig, MlpMixer, check_class_names
from mixer.preprocess import Preprocessing
from mixer.resources import check_npz

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "mlp-mixer"
VERSION = 2  # 1: normalization/resize/image_shape at the top level; 2: one preprocessing record


def save_model(model: MlpMixer, directory: Path, source: dict | None = None,
               trained_on: dict | None = None, kept: dict | None = None, environment: dict | None = None) -> None:
    """Write `model.safetensors` and `config.json` (architecture, classes, preprocessing) atomically.

    trained_on: the prepared data the weights were trained on (its hash and split), which evaluation
    checks its data against. kept: which epoch of the run the weights are (`keep: best|last`).
    environment: what else decides the exact numbers (threads, library versions; `environment()`).
    """
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for (k, v) in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": model.config.to_dict(),
        "class_names": model.class_names,
        "preprocessing": model.preprocessing.to_dict(),
    }
    if source is not None:
        meta["source"] = source
    if trained_on is not None:
        meta["trained_on"] = trained_on
    if kept is not None:
        meta["kept"] = kept
    if environment is not None:
        meta["environment"] = environment
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")  # UTF-8


def environment(processes: int = 1, device: str = "cpu", precision: str = "no") -> dict:
    """What a run's exact numbers depend on besides its params and data: the reduction order of the matrix
    products changes with the thread count, the kernels with the versions and the device."""
    import platform

    import numpy

    return {"threads": torch.get_num_threads(), "processes": processes, "device": device,
            "mixed_precision": precision, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "machine": platform.machine()}


def read_config(directory: Path) -> dict:
    """The parsed `config.json` of a model directory, checked for the keys this project needs."""
    directory = Path(directory)
    path = directory / CONFIG
    if not directory.is_dir():
        raise MixerError(f"model directory {directory} does not exist" if not directory.exists()
                         else f"model directory {directory} is not a folder")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise MixerError(f"{path} is missing: not a model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MixerError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from None
    except OSError as exc:
        raise MixerError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("architecture"), dict):
        raise MixerError(f"{path} is not an MLP-Mixer config (no format: {FORMAT!r} and architecture)")
    if meta.get("version", 1) == 1:  # written before the preprocessing record existed
        normalization = meta.get("normalization", {"mean": [0.5] * 3, "std": [0.5] * 3})
        meta["preprocessing"] = {"resize": meta.get("resize", "stretch"), **normalization}
    return meta


def describe(directory: Path) -> tuple[MixerConfig, list[str], Preprocessing, dict]:
    """Architecture, class names, preprocessing and the whole config of a model directory, checked."""
    meta = read_config(directory)
    path = Path(directory) / CONFIG
    try:
        config = MixerConfig.from_dict(meta["architecture"])
        names = check_class_names(meta.get("class_names"), config.num_classes)
        preprocessing = Preprocessing.from_dict(meta.get("preprocessing"))
    except (MixerError, TypeError) as exc:
        raise MixerError(f"{path}: {exc}") from None
    return config, names, preprocessing, meta


def load_model(directory: Path, device: str | torch.device = "cpu") -> MlpMixer:
    """Load a model directory, ready for inference (eval mode); `.meta` holds its config.json."""
    config, names, preprocessing, meta = describe(directory)
    model = MlpMixer(config, names, preprocessing)
    weights = Path(directory) / WEIGHTS
    state = read_tensors(weights)
    bad = [k for (k, v) in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise MixerError(f"{weights} holds NaN or infinite weights ({_few(bad)}): the training that wrote it "
                         "diverged; train again with a lower lr")
    load_state(model, state, weights)
    model.meta = meta
    return model.to(device).eval()


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from `.safetensors`, `.pth`/`.bin` (weights only, never unpickling code) or `.npz`."""
    path = Path(path)
    if not path.is_file():
        raise MixerError(f"{path} does not exist" if not path.exists() else
                         f"{path} is a folder, not a weights file" if path.is_dir() else f"{path} is not a regular file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        if path.suffix == ".npz":
            check_npz(path)  # every shape and dtype from the headers first: a zip bomb is one line, not an OOM
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
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
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
    return _rename({_jax_name(k): v for (k, v) in state.items()}, _JAX, convert, source)


def _jax_name(key: str) -> str:
    """A vit_jax `.npz` key without the optional leading '/' and 'params/' some exports add."""
    return key.lstrip("/").removeprefix("params/")


def infer_config(state: dict[str, torch.Tensor], gelu: str,
                 image_shape: tuple[int, int] | None = None) -> MixerConfig:
    """The architecture that a state dict in this project's names implies; `image_shape`, when its patch
    count is the weights', says which grid they hold (a square one is inferred otherwise)."""
    try:
        stem = state["stem.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        token_fc1 = state["blocks.0.token_mlp.fc1.weight"]
        channel_fc1 = state["blocks.0.channel_mlp.fc1.weight"]
        head = state["head.weight"]
    except (KeyError, ValueError) as exc:
        raise MixerError(f"not an MLP-Mixer checkpoint: no tensor {exc}") from None
    for (name, tensor, rank) in (("stem.weight", stem, 4), ("blocks.0.token_mlp.fc1.weight", token_fc1, 2),
                                 ("blocks.0.channel_mlp.fc1.weight", channel_fc1, 2), ("head.weight", head, 2)):
        if tensor.dim() != rank:
            raise MixerError(f"not an MLP-Mixer checkpoint: {name} has {tensor.dim()} dimensions, not {rank}")
    dim, in_chans, ph, pw = stem.shape
    token_hidden, num_patches = token_fc1.shape
    if image_shape is None or (image_shape[0] // ph) * (image_shape[1] // pw) != num_patches:
        # a shape of another patch count is one to expand to (mixer.model.at_image_shape), not the weights' own
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise MixerError(f"{num_patches} patches is not a square grid: give the image shape the weights were "
                             "trained at")
        image_shape = (side * ph, side * pw)
    return MixerConfig(image_shape=tuple(image_shape), patch_shape=(ph, pw), depth=depth, dim=dim,
                       token_hidden=token_hidden, channel_hidden=channel_fc1.shape[0],
                       num_classes=head.shape[0], in_chans=in_chans, gelu=gelu)


def convert_weights(source: Path, image_shape: tuple[int, int] | None = None) -> MlpMixer:
    """A timm state dict or a vit_jax `.npz` as a model, its architecture inferred from the tensors."""
    source = Path(source)
    raw = read_tensors(source)
    if any(_jax_name(k).startswith("stem/") for k in raw):
        state, gelu = _from_jax(raw, source), "tanh"  # the official code uses GELU's tanh form
    elif "stem.proj.weight" in raw:
        state, gelu = _from_timm(raw, source), "exact"
    elif "stem.weight" in raw:
        state, gelu = dict(raw), "exact"  # already this project's names
    else:
        raise MixerError(f"{source} is neither a timm MlpMixer nor a vit_jax Mixer checkpoint")
    try:
        model = MlpMixer(infer_config(state, gelu, image_shape))
    except MixerError as exc:
        raise MixerError(f"{source}: {exc}") from None
    load_state(model, state, source)
    return model


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
