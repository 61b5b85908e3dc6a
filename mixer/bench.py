"""Throughput, FLOP/s, MFU and data wait of the Mixer, against a plain reference of the same math.

The reference is how most public implementations write MLP-Mixer: token mixing as transpose →
`nn.Linear` → transpose. It is a second implementation of the block on purpose (with
`mixer.model` and the tests' plain-tensor equations, one of three), so the comparison has
something to compare. Ours and the reference are timed interleaved (A B, B A, …) in one run and
compared by medians, so a busy machine slows both alike.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixer.model import MixerConfig, MlpMixer
from mixer.preprocess import Preprocessing


# ---- the plain reference ---------------------------------------------------------------------

class _PlainBlock(nn.Module):
    def __init__(self, c: MixerConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim, eps=1e-6)
        self.token_fc1 = nn.Linear(c.num_patches, c.token_hidden)
        self.token_fc2 = nn.Linear(c.token_hidden, c.num_patches)
        self.norm2 = nn.LayerNorm(c.dim, eps=1e-6)
        self.channel_fc1 = nn.Linear(c.dim, c.channel_hidden)
        self.channel_fc2 = nn.Linear(c.channel_hidden, c.dim)

    def forward(self, x):
        y = self.norm1(x).transpose(1, 2)
        y = self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        x = x + y
        return x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))


class ReferenceMixer(nn.Module):
    """The textbook formulation, for comparison only."""

    def __init__(self, c: MixerConfig):
        super().__init__()
        self.stem = nn.Conv2d(c.in_chans, c.dim, c.patch_shape, c.patch_shape)
        self.blocks = nn.Sequential(*[_PlainBlock(c) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))

    def load_from(self, ours: MlpMixer) -> "ReferenceMixer":
        """Copy our weights in, so both compute the same function."""
        sd = {}
        for (k, v) in ours.state_dict().items():
            k = (k.replace("token_norm", "norm1").replace("channel_norm", "norm2")
                  .replace("token_mlp.fc", "token_fc").replace("channel_mlp.fc", "channel_fc"))
            sd[k] = v
        self.load_state_dict(sd)
        return self


# ---- counting ----------------------------------------------------------------------------------

def forward_flops(c: MixerConfig) -> int:
    """Multiply-adds × 2 of one image's forward pass (matmuls only; norms and GELU are O(S·C))."""
    s, patch_in = c.num_patches, c.in_chans * c.patch_shape[0] * c.patch_shape[1]
    stem = s * patch_in * c.dim
    block = c.dim * 2 * s * c.token_hidden + s * 2 * c.dim * c.channel_hidden
    return 2 * (stem + c.depth * block + c.dim * c.num_classes)


def train_flops(c: MixerConfig) -> int:
    """Forward plus backward (≈ 2× forward: gradients for inputs and for weights)."""
    return 3 * forward_flops(c)


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 20) -> float:
    """Measured GFLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- timing ------------------------------------------------------------------------------------

@dataclass
class Timing:
    train_s: list[float]
    infer_s: list[float]


def _train_step(model, optimizer, x, y, autocast_dtype):
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.inference_mode()
def _infer_step(model, x, autocast_dtype):
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model(x)


def interleaved(models: dict[str, nn.Module], c: MixerConfig, batch: int, steps: int, device: torch.device,
                autocast_dtype: torch.dtype | None = None) -> dict:
    """Time train and inference steps of each model in turn (A B, B A, …); returns per-step seconds
    and the best matmul GFLOP/s probed before and after."""
    x = torch.randn(batch, c.in_chans, *c.image_shape, device=device)
    y = torch.randint(c.num_classes, (batch,), device=device)
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for (k, m) in models.items()}
    result = {k: Timing([], []) for k in models}
    # the matmul peak, probed before and after the timed rounds (never right before one model only)
    result["peak_gflops"] = matmul_peak(device, autocast_dtype or torch.float32)
    for (k, m) in models.items():  # warm-up: allocator, kernels, compile
        for _ in range(2):
            _train_step(m, optimizers[k], x, y, autocast_dtype)
            _infer_step(m, x, autocast_dtype)
    names = list(models)
    # training steps back to back, as in training (an inference step between them would change what
    # the allocator has cached); then the inference steps. Each interleaved A B, B A, …
    for (phase, run) in (("train_s", lambda k: _train_step(models[k], optimizers[k], x, y, autocast_dtype)),
                         ("infer_s", lambda k: _infer_step(models[k], x, autocast_dtype))):
        for step in range(steps):
            for k in (names if step % 2 == 0 else names[::-1]):  # neither always goes first
                _sync(device)
                start = time.perf_counter()
                run(k)
                _sync(device)
                getattr(result[k], phase).append(time.perf_counter() - start)
    result["peak_gflops"] = max(result["peak_gflops"], matmul_peak(device, autocast_dtype or torch.float32))
    return result


def data_wait_share(model: nn.Module, split, batch: int, steps: int, device: torch.device) -> float:
    """Share of a training step spent fetching the batch from the cache (the real data path)."""
    standardize = Preprocessing().standardize
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    perm = torch.randperm(len(split)).numpy()
    wait = compute = 0.0
    for step in range(steps + 2):
        rows = perm[(step * batch) % max(len(split) - batch, 1):][:batch]
        start = time.perf_counter()
        x, y = split.batch(rows, device)
        _sync(device)
        fetched = time.perf_counter()
        _train_step(model, optimizer, standardize(x), y, None)
        _sync(device)
        if step >= 2:
            wait += fetched - start
            compute += time.perf_counter() - fetched
    return wait / (wait + compute)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark(c: MixerConfig, batch: int, steps: int, device: torch.device, peak_gflops: float,
              autocast_dtype: torch.dtype | None = None, compile: bool = False) -> dict:
    """All figures for one config: ours vs the reference, interleaved in this run."""
    torch.manual_seed(0)
    ours = MlpMixer(c).to(device)
    nn.init.normal_(ours.head.weight, std=0.02)  # a nonzero head, so the equality check means something
    reference = ReferenceMixer(c).to(device).load_from(ours)
    with torch.inference_mode():
        probe = torch.randn(2, c.in_chans, *c.image_shape, device=device)
        same = (ours(probe) - reference(probe)).abs().max().item()
    models = {"ours": ours, "reference": reference}
    compile_s = None
    if compile:
        start = time.perf_counter()
        models["ours_compiled"] = torch.compile(MlpMixer(c).to(device))
        _train_step(models["ours_compiled"], torch.optim.SGD(models["ours_compiled"].parameters(), lr=0.0),
                    torch.randn(batch, c.in_chans, *c.image_shape, device=device),
                    torch.zeros(batch, dtype=torch.long, device=device), autocast_dtype)
        compile_s = time.perf_counter() - start
    timings = interleaved(models, c, batch, steps, device, autocast_dtype)
    peak_gflops = max(peak_gflops, timings.pop("peak_gflops"))
    out = {"batch": batch, "patches": c.num_patches, "depth": c.depth, "dim": c.dim,
           "max_abs_difference": same, "train_gflop_per_image": train_flops(c) / 1e9,
           "peak_gflops": peak_gflops, "compile_warmup_s": compile_s}
    for (name, t) in timings.items():
        train_step = statistics.median(t.train_s)
        infer_step = statistics.median(t.infer_s)
        achieved = train_flops(c) * batch / train_step / 1e9
        out[name] = {"train_images_per_s": batch / train_step, "infer_images_per_s": batch / infer_step,
                     "train_gflops": achieved, "mfu": achieved / peak_gflops}
    out["speedup_train"] = out["ours"]["train_images_per_s"] / out["reference"]["train_images_per_s"]
    out["speedup_infer"] = out["ours"]["infer_images_per_s"] / out["reference"]["infer_images_per_s"]
    out["peak_memory_mib"] = peak_memory_mib(device)
    return out
