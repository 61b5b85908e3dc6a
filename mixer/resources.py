"""Resources checked before they are spent: memory for training, disk for prepared data and downloads,
and the sizes a `.npz` declares before anything in it is decompressed.

Each check is arithmetic on what is known up front (the architecture, the batch, the number of
images, a header) against what the machine has now, and refuses with one `MixerError` line that
names the setting to change: a run that cannot fit stops in `mixer check`, not an hour in, with
the kernel's OOM killer or a half-written file.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from mixer.errors import MixerError
from mixer.model import MixerConfig, config_at, grid_multiple

GiB = 1 << 30
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}  # per-parameter tensors each optimizer keeps (moments, momentum)
# No Mixer of the paper comes near this (H/14 at 448 px has 0.46 G parameters); beyond it a `.npz`
# is not weights but a mistake or an attack.
MAX_NPZ_ELEMENTS = 1 << 32
# Resident memory beyond the live tensors: glibc's and CUDA's caching allocators keep freed blocks
# (measured on CPU with pipeline.allocator's settings: ~20% more than the tensors' peak,
# tests/test_resources.py) and small buffers.
ALLOCATOR_SLACK = 1.2
ALLOCATOR_FIXED = 64 << 20


def format_bytes(n: float) -> str:
    """Bytes for a message: in bytes, MiB, GiB or TiB (one decimal), whichever reads best."""
    if n >= 1024 * GiB:
        return f"{n / (1024 * GiB):.1f} TiB"
    if n >= GiB / 10:
        return f"{n / GiB:.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= (1 << 20) / 10 else f"{int(n)} bytes"


# ---- memory ------------------------------------------------------------------------------------

def parameter_count(c: MixerConfig) -> int:
    """The number of weights of the Mixer `c` describes (what `sum(p.numel())` of the model says)."""
    p, d, s, h = c.num_patches, c.dim, c.token_hidden, c.channel_hidden
    stem = c.in_chans * c.patch_shape[0] * c.patch_shape[1] * d + d
    block = 2 * 2 * d + (p * s + s) + (s * p + p) + (d * h + h) + (h * d + d)  # 2 norms, token MLP, channel MLP
    return stem + c.depth * block + 2 * d + d * c.num_classes + c.num_classes


def activation_values(c: MixerConfig, grad_checkpointing: bool = False) -> int:
    """Values held per image during a training step: those saved for backward, the input, the backward's gradients.

    Saved for backward (what autograd keeps, traced op by op in `mixer.model`; P patches, C = dim,
    D_S = token_hidden, D_C = channel_hidden), per block:
      token mixing   LayerNorm input x and its output (P·C each), fc1's output and GELU's output
                     (C·D_S each; the GEMMs save their inputs, which are these, not copies)
      channel mixing LayerNorm input and output (P·C each), fc1's output and GELU's output (P·D_C each)
    so 4·P·C + 2·C·D_S + 2·P·D_C per block; around them the stem's unfolded patches (3·H·W, a copy),
    the final LayerNorm's input (P·C), the pooled features (C), the logits (classes). LayerNorm
    statistics (2·P per norm) and dropout masks are small beside these and left out.
    Not saved but alive at the peak: the float input batch (3·H·W), and in the backward the
    gradient of the widest hidden layer before and after GELU (2·max(P·D_C, C·D_S)).
    `grad_checkpointing` (MlpMixer.set_grad_checkpointing): each block keeps only its input (P·C) and one
    block's saved values are alive at a time, recomputed in the backward: depth·P·C + one block's
    (less its input, which it shares).
    """
    p, d, s, h = c.num_patches, c.dim, c.token_hidden, c.channel_hidden
    pixels = c.in_chans * c.image_shape[0] * c.image_shape[1]
    per_block = 4 * p * d + 2 * d * s + 2 * p * h
    # the recomputed block's token LayerNorm input is its kept input, not a new tensor
    blocks = c.depth * p * d + per_block - p * d if grad_checkpointing else c.depth * per_block
    saved = blocks + pixels + p * d + d + c.num_classes
    return saved + pixels + 2 * max(p * h, d * s, p * d)


def inference_values(c: MixerConfig) -> int:
    """Values alive per image in a forward without autograd (validation, evaluate, predict, a frozen
    trunk): the float input and its standardised copy (3·H·W each), the residual stream and a block's
    norm output and sum (3·P·C), the widest hidden layer before and after GELU (2·max(P·D_C, C·D_S)), and
    the logits."""
    p, pixels = c.num_patches, c.in_chans * c.image_shape[0] * c.image_shape[1]
    return 2 * pixels + 3 * p * c.dim + 2 * max(p * c.channel_hidden, c.dim * c.token_hidden) + c.num_classes


def _terms(c: MixerConfig, optimizer: str, ema: bool, frozen: bool, models: int,
           grad_checkpointing: bool = False) -> tuple[int, int, int]:
    """(values kept all run, values per image at the activation peak, values of the optimizer step's temporary)."""
    if optimizer not in OPTIMIZER_STATES:
        raise MixerError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    n, states = parameter_count(c), OPTIMIZER_STATES[optimizer]
    if frozen:  # only the head has gradients and optimizer states; the forward keeps nothing for backward
        head = c.dim * c.num_classes + c.num_classes
        persistent = n + head * (1 + states) + (n if ema else 0)
        return models * persistent, inference_values(c), head
    return models * n * (2 + states + (1 if ema else 0)), activation_values(c, grad_checkpointing), n


def training_memory(c: MixerConfig, batch_size: int, bytes_per_value: int = 4, optimizer: str = "adamw",
                    ema: bool = False, frozen: bool = False, models: int = 1, grad_checkpointing: bool = False,
                    eval_batch_size: int = 0) -> int:
    """Bytes the live tensors of a training step of `c` at `batch_size` images reach at their peak (fp32: 4 a value).

      parameters × (weights + gradients + optimizer states [+ an EMA copy]) × models
      + max(batch_size × activation_values(c), parameters)
    AdamW keeps two moments, SGD one momentum. The activations (see `activation_values`: what one
    image holds in a step) are freed before the optimizer step, whose temporary (one
    parameter-sized tensor in PyTorch's multi-tensor AdamW, as on GPUs) comes after them: the
    larger of the two counts. `frozen`: only the head trains (a linear probe), so nothing is kept
    for backward; the forward's working set (the input, the residual stream and the widest hidden
    layer before and after GELU) replaces it. `models`: models trained side by side (the
    benchmark's ours and reference), one step at a time. `grad_checkpointing`: see `activation_values`.
    `eval_batch_size`: the validation after each epoch, a forward of that many images without autograd
    (`inference_values`) beside the persistent tensors; it too can be the peak.
    The allocator's own overhead (about 20% more resident memory, measured in
    tests/test_resources.py) is not in this number; `check_training_memory` adds it.
    """
    persistent, per_image, step = _terms(c, optimizer, ema, frozen, models, grad_checkpointing)
    peak = max(batch_size * per_image, step, eval_batch_size * inference_values(c))
    return (persistent + peak) * bytes_per_value


def available_memory(device: str | None = None) -> tuple[int, str]:
    """Bytes free now for a run on `device` ('cuda…' or 'cpu'; None: CUDA when there is one), and where."""
    if device is None or str(device).startswith("cuda"):
        import torch  # only here: the disk and npz checks need no torch

        if torch.cuda.is_available():
            index = torch.device(device or "cuda").index
            if index is None:  # a rank of a multi-GPU run trains on its LOCAL_RANK's GPU
                from mixer.launch import processes

                index = processes().local_rank % torch.cuda.device_count()
            free, _ = torch.cuda.mem_get_info(index)
            return free, f"GPU {index} ({torch.cuda.get_device_name(index)})"
    try:  # MemAvailable: free plus what the kernel can reclaim (caches) without swapping
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (ValueError, OSError, AttributeError):  # no such sysconf here: nothing to check against
        return 1 << 62, "RAM"


def check_training_memory(c: MixerConfig, batch_size: int, *, variant: str | None = None, optimizer: str = "adamw",
                          ema: bool = False, frozen: bool = False, models: int = 1, processes: int = 1,
                          device: str | None = None, grad_checkpointing: bool = False,
                          eval_batch_size: int = 0) -> int:
    """Refuse (naming batch_size or eval_batch_size, the variant and image_shape) a training step, or the
    validation after an epoch, that cannot fit in memory.

    `processes`: ranks sharing this machine's RAM (on GPUs each has its own). Returns the bytes needed.
    """
    persistent, per_image, step = _terms(c, optimizer, ema, frozen, models, grad_checkpointing)
    need = _with_slack(training_memory(c, batch_size, optimizer=optimizer, ema=ema, frozen=frozen, models=models,
                                       grad_checkpointing=grad_checkpointing, eval_batch_size=eval_batch_size))
    have, where = available_memory(device)
    shared = processes if where == "RAM" else 1
    if need * shared <= have:
        return need
    # the largest batch that fits: undo the slack, then the fixed part, in values of 4 bytes
    room = int((have / shared - ALLOCATOR_FIXED) / ALLOCATOR_SLACK / 4 - persistent)
    evaluating = eval_batch_size * inference_values(c) > max(batch_size * per_image, step)
    (key, size, per) = ("eval_batch_size", eval_batch_size, inference_values(c)) if evaluating else \
        ("batch_size", batch_size, per_image)
    fits = room // per
    ranks = f" per process × {shared}" if shared > 1 else ""
    arch = f"variant {variant}" if variant else f"depth {c.depth}, dim {c.dim}"
    arch += f", image_shape {list(c.image_shape)}"
    advice = (f"lower {key} to at most {fits}" if fits >= 1 else
              f"even {key} 1 does not fit: choose a smaller variant or image_shape")
    what = "to validate after each epoch" if evaluating else "to train"
    raise MixerError(f"{key} {size} with {arch} needs about {format_bytes(need)}{ranks} of memory {what}, "
                     f"but {format_bytes(have)} of {where} is available; {advice}")


def check_inference_memory(c: MixerConfig, batch_size: int, key: str = "eval_batch_size",
                           device: str | None = None) -> int:
    """Refuse (naming `key`) a forward of `batch_size` images without autograd that cannot fit in memory."""
    need = _with_slack((parameter_count(c) + batch_size * inference_values(c)) * 4)
    have, where = available_memory(device)
    if need <= have:
        return need
    fits = int((have - ALLOCATOR_FIXED) / ALLOCATOR_SLACK / 4 - parameter_count(c)) // inference_values(c)
    advice = f"lower {key} to at most {fits}" if fits >= 1 else "even one image does not fit: use a smaller model"
    raise MixerError(f"{key} {batch_size} at image_shape {list(c.image_shape)} needs about {format_bytes(need)} of "
                     f"memory, but {format_bytes(have)} of {where} is available; {advice}")


def expansion_memory(c: MixerConfig, image_shape: tuple[int, int]) -> int:
    """Bytes the live tensors reach while `mixer.model.at_image_shape` expands `c`'s weights to `image_shape`
    (fp32; 0 at their own size, which needs no copy).

    Beside the original model and the wider one it builds (`config_at`), the larger of two moments:
    initialising the wider model, where `nn.init.trunc_normal_` resamples a token-mixing weight W
    through about 3¼ temporaries of W's size (two candidates, the result, a boolean mask; traced op
    by op in tests/test_predict_rules.py), and expanding the last block's fc2, when the expanded
    token-mixing tensors of every block are held until they are loaded and the block-diagonal
    temporary it is copied from is one more W; and the patch grouping's index.
    """
    if grid_multiple(c, image_shape) == (1, 1):
        return 0
    wide = config_at(c, image_shape)
    p, s = wide.num_patches, wide.token_hidden
    token_mixing = c.depth * (2 * p * s + s + p)  # fc1 and fc2, weights and biases
    temporaries = max(13 * p * s // 4, token_mixing + p * s)
    index = 2 * p  # `patch_groups`: one int64 per patch
    return (parameter_count(c) + parameter_count(wide) + temporaries + index) * 4


def check_expansion_memory(c: MixerConfig, image_shape: tuple[int, int], device: str = "cpu") -> int:
    """Refuse (naming image_shape and the largest whole multiple that fits) expanding `c`'s token mixing to
    `image_shape` when it cannot fit in memory, before anything is built. Returns the bytes needed."""
    (kh, kw) = grid_multiple(c, image_shape)
    if (kh, kw) == (1, 1):
        return 0
    need = _with_slack(expansion_memory(c, image_shape))
    have, where = available_memory(device)
    if need <= have:
        return need
    (height, width) = c.image_shape
    m = 1  # the largest m for which (m·H, m·W) fits: the cost grows as m⁴, so this loop is short
    while _with_slack(expansion_memory(c, ((m + 1) * height, (m + 1) * width))) <= have:
        m += 1
    advice = (f"at most [{m * height}, {m * width}]" if m > 1 else
              f"only the weights' own [{height}, {width}] fits, without expansion")
    raise MixerError(f"image_shape {list(image_shape)} expands the token mixing of weights for [{height}, {width}] "
                     f"{kh * kw}-fold ({kh}x{kw}): about {format_bytes(need)} of memory to build, but "
                     f"{format_bytes(have)} of {where} is available; choose a smaller image_shape: {advice}")


def _with_slack(tensor_bytes: int) -> int:
    """What the tensors cost in resident memory: the allocator keeps freed blocks and rounds up."""
    return int(tensor_bytes * ALLOCATOR_SLACK) + ALLOCATOR_FIXED


# ---- disk --------------------------------------------------------------------------------------

def prepared_bytes(n_images: int, image_shape: tuple[int, int]) -> int:
    """Bytes `prepare` writes for `n_images` images: images.npy (n × H × W × 3 uint8) plus slack.

    The slack covers the .npy header, manifest.csv (a path, a label and a 64-digit hash per image)
    and prepared.json: 1 KiB per image and 1 MiB, more than they take.
    """
    height, width = image_shape
    return n_images * (height * width * 3 + 1024) + (1 << 20)


def free_disk(folder: Path) -> int:
    """Free bytes, for this user, on the filesystem that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(need: int, folder: Path, what: str, advice: str) -> None:
    """Refuse writing `need` bytes of `what` into `folder` when its filesystem has less free."""
    have = free_disk(folder)
    if need > have:
        raise MixerError(f"{what} needs {format_bytes(need)} but {folder} has {format_bytes(have)} free; {advice}")


def check_prepare_disk(n_images: int, image_shape: tuple[int, int], folder: Path) -> None:
    """Refuse decoding `n_images` at `image_shape` into `folder` when they cannot fit on its disk."""
    check_disk(prepared_bytes(n_images, image_shape), folder,
               f"prepare: {n_images} images at image_shape {list(image_shape)} ({n_images} × "
               f"{image_shape[0]} × {image_shape[1]} × 3 bytes)",
               "free disk space, or choose a smaller image_shape")


# ---- .npz archives -----------------------------------------------------------------------------

def npz_members(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in a `.npz`, read from each member's .npy header, nothing decompressed
    beyond the headers; a member that is not a well-formed .npy, or holds fewer bytes than its header
    declares, is an error naming it."""
    bad = f"{path} is not a readable weights file"
    out = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):  # np.load would hand it back as raw bytes, of any size
                    raise MixerError(f"{bad} (member {info.filename!r} is not a .npy array)")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(member)
                    header = member.tell()
                name = info.filename[:-len(".npy")]
                count = int(np.prod(shape, dtype=object))  # Python ints: a declared 10^30 does not wrap
                if dtype.hasobject:
                    raise MixerError(f"{bad} (Object arrays cannot be loaded: {name} holds Python objects, "
                                     "not numbers)")
                if dtype.kind not in "biuf" or dtype.fields is not None:
                    raise MixerError(f"{bad} ({name} has dtype {dtype}, not numbers)")
                if count * dtype.itemsize > info.file_size - header:  # the archive's own size for it
                    raise MixerError(f"{bad} ({name} declares shape {list(shape)} of {dtype}, "
                                     f"{count * dtype.itemsize} bytes, but holds {info.file_size - header})")
                out[name] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise MixerError(f"{bad} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return out


def check_npz(path: Path) -> None:
    """Refuse a `.npz` whose arrays, as float32 tensors, are absurd or would not fit in memory, before reading it."""
    members = npz_members(path)
    count = sum(int(np.prod(shape, dtype=object)) for (shape, _) in members.values())
    if count > MAX_NPZ_ELEMENTS:
        raise MixerError(f"{path} declares {count} values, more than any MLP-Mixer has ({MAX_NPZ_ELEMENTS}); "
                         "it is not a weights file")
    # read as stored, then converted to float32 beside it (the stored copy is freed per member)
    need = count * 4 + max((int(np.prod(s, dtype=object)) * d.itemsize for (s, d) in members.values()), default=0)
    have, _ = available_memory("cpu")
    if need > have:
        raise MixerError(f"{path} needs {format_bytes(need)} of memory to read but {format_bytes(have)} is available")
