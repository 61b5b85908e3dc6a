"""Everything worth knowing on a machine with an NVIDIA GPU, in one run of a few minutes; one JSON.

    bash benchmarks/gpu_check.sh [--out gpu_check.json]      # on the GPU machine
    bash benchmarks/gpu_check.sh --dry-run --out /tmp/x.json  # anywhere: the CPU, tiny sizes, every code path

Sections of the JSON (each holds "error" instead when it failed; the others still run):
  environment  torch, CUDA, the GPUs, and which reference the step is compared with
  tests        `pytest -m gpu -q -rs`: exit code, the summary line, the skip reasons
  peak         a bf16 GEMM's TFLOP/s measured here (a large torch.matmul): MFU's denominator
  train_step   per variant (S/16, B/16 at 224x224, bf16 autocast, AdamW as the engine builds it):
               ours vs timm's MlpMixer (if timm is importable) or mixer.bench.ReferenceMixer, timed
               interleaved (A B, B A, ...): images/s, TFLOP/s, MFU, peak memory of each
  data_wait    the real reader (mixer.engine.prefetched over a memory-mapped uint8 cache, pinned
               memory on a GPU): wall time of steps fed by it against the same steps on a batch
               already on the device; the difference's share is the time the step waits for data
  syncs        host syncs per optimizer step inside an epoch of the real loop (mixer.engine.train):
               on CUDA counted by torch.cuda.set_sync_debug_mode("warn"), on the CPU (dry run) as
               tests/test_syncs.py counts the host's reads of tensors
  predict      `mixer predict` on generated JPEGs (2,000; 50 in a dry run): images/s of the command.
               It runs on the CPU wherever it runs: mixer predict has no device option

Installs nothing: run `pip install -e ".[test]"` once (gpu_check.sh does when the imports fail).
Printed figures are of one run on one machine; nothing is asserted beyond the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixer.augment import AugmentConfig  # noqa: E402
from mixer.bench import ReferenceMixer, matmul_peak, train_flops  # noqa: E402
from mixer.data import Split  # noqa: E402
from mixer.engine import Machine, Reporter, TrainConfig, prefetched, train  # noqa: E402
from mixer.model import MixerConfig, MlpMixer, variant_fields  # noqa: E402
from mixer.optim import build_optimizer, wants_fused  # noqa: E402
from mixer.preprocess import Preprocessing  # noqa: E402

SECTIONS = ("environment", "tests", "peak", "train_step", "data_wait", "syncs", "predict")


def sizes(dry: bool) -> dict:
    """What each section runs at: the real sizes, or tiny ones for a dry run on the CPU."""
    if dry:
        return dict(variants={"S/16": dict(patch_shape=(16, 16), depth=1, dim=32, token_hidden=16, channel_hidden=64),
                              "B/16": dict(patch_shape=(16, 16), depth=1, dim=48, token_hidden=24, channel_hidden=96)},
                    image=32, batch=4, warmup=1, repeats=2, burst=1, gemm=256, cache_images=64, sync_images=48,
                    predict_images=50, predict_side=32, classes=10)
    return dict(variants={v: variant_fields(v) for v in ("S/16", "B/16")}, image=224, batch=128, warmup=5,
                repeats=10, burst=5, gemm=8192, cache_images=2048, sync_images=1280, predict_images=2000,
                predict_side=256, classes=1000)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- environment ---------------------------------------------------------------------------------

def reference_kind() -> str:
    try:
        import timm  # noqa: F401
        return "timm"
    except ImportError:
        return "mixer.bench.ReferenceMixer"


def environment(device: torch.device, dry: bool) -> dict:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"dry_run": dry, "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": gpus, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "reference": reference_kind(), "fused_optimizer": wants_fused(device),
            "autocast": "bf16"}


# ---- tests ---------------------------------------------------------------------------------------

def tests() -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    return {"command": " ".join(["pytest"] + cmd[3:]), "returncode": done.returncode,
            "summary": lines[-1] if lines else done.stderr.strip()[-500:],
            "skipped": [line for line in lines if line.startswith("SKIPPED")],
            "failed": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            "seconds": time.perf_counter() - started}


# ---- the training step ---------------------------------------------------------------------------

def reference_model(c: MixerConfig) -> torch.nn.Module:
    try:
        from timm.models.mlp_mixer import MlpMixer as TimmMixer
    except ImportError:
        return ReferenceMixer(c)
    return TimmMixer(num_classes=c.num_classes, img_size=c.image_shape, in_chans=c.in_chans,
                     patch_size=c.patch_shape[0], num_blocks=c.depth, embed_dim=c.dim,
                     mlp_ratio=(c.token_hidden / c.dim, c.channel_hidden / c.dim))


def train_step(model, optimizer, x, y, autocast: torch.dtype) -> None:
    with torch.autocast(x.device.type, dtype=autocast):
        logits = model(x)
    F.cross_entropy(logits.float(), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_timing(c: MixerConfig, s: dict, device: torch.device, peak_tflops: float) -> dict:
    """Ours and the reference, the same architecture and batch, timed in turns (A B, B A, ...)."""
    torch.manual_seed(0)
    models = {"ours": MlpMixer(c).to(device), "reference": reference_model(c).to(device)}
    optimizers = {k: build_optimizer(m, "adamw", 1e-4, 0.9, 0.05, fused=wants_fused(device))
                  for (k, m) in models.items()}
    x = torch.randn(s["batch"], c.in_chans, *c.image_shape, device=device)
    y = torch.randint(c.num_classes, (s["batch"],), device=device)
    memory = {}
    for (k, m) in models.items():  # warm-up, and each one's peak memory alone
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(s["warmup"]):
            train_step(m, optimizers[k], x, y, torch.bfloat16)
        sync(device)
        memory[k] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    seconds = {k: [] for k in models}
    names = list(models)
    for r in range(s["repeats"]):
        for k in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            start = time.perf_counter()
            for _ in range(s["burst"]):
                train_step(models[k], optimizers[k], x, y, torch.bfloat16)
            sync(device)
            seconds[k].append((time.perf_counter() - start) / s["burst"])
    flops = train_flops(c) * s["batch"]
    out = {"batch": s["batch"], "image": list(c.image_shape), "depth": c.depth, "dim": c.dim,
           "train_gflop_per_image": train_flops(c) / 1e9}
    for k in models:
        step = statistics.median(seconds[k])
        out[k] = {"step_ms": step * 1e3, "step_ms_range": [min(seconds[k]) * 1e3, max(seconds[k]) * 1e3],
                  "images_per_s": s["batch"] / step, "tflops": flops / step / 1e12,
                  "mfu": flops / step / 1e12 / peak_tflops, "peak_memory_gib": memory[k]}
    out["speedup"] = out["reference"]["step_ms"] / out["ours"]["step_ms"]
    del models, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- the data path -------------------------------------------------------------------------------

def memmap_cache(folder: Path, n: int, side: int, classes: int) -> Split:
    """A prepared-like cache: uint8 images in a memory-mapped .npy, as prepared/ holds them."""
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, side, side, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, 256):
        images[i:i + 256] = rng.integers(0, 255, size=images[i:i + 256].shape, dtype=np.uint8)
    images.flush()
    del images
    labels = (np.arange(n) % classes).astype(np.int64)
    return Split(np.load(folder / "images.npy", mmap_mode="r"), labels, [f"{i}.png" for i in range(n)],
                 [str(c) for c in range(classes)])


def data_wait(c: MixerConfig, split: Split, s: dict, device: torch.device) -> dict:
    """The step fed by the loop's reader against the same step on a batch already on the device."""
    torch.manual_seed(0)
    model = MlpMixer(c).to(device)
    optimizer = build_optimizer(model, "adamw", 1e-4, 0.9, 0.05, fused=wants_fused(device))
    standardize = Preprocessing().standardize
    rng = np.random.default_rng(1)
    steps = max(len(split) // s["batch"], 2)
    batches = [np.sort(rng.choice(len(split), s["batch"], replace=False)) for _ in range(steps)]
    resident = [split.batch(batches[0], device)] * steps

    def run(reader) -> tuple[float, float]:
        waited = 0.0
        sync(device)
        start = time.perf_counter()
        iterator = iter(reader)
        while True:
            before = time.perf_counter()
            try:
                images, labels = next(iterator)
            except StopIteration:
                break
            waited += time.perf_counter() - before
            train_step(model, optimizer, standardize(images), labels, torch.bfloat16)
        sync(device)
        return time.perf_counter() - start, waited

    run(resident[:s["warmup"]])
    times: dict[str, list[float]] = {"prefetched": [], "resident": []}
    host_wait = []
    for r in range(max(s["repeats"] // 2, 1)):
        for name in (("prefetched", "resident") if r % 2 == 0 else ("resident", "prefetched")):
            total, waited = run(prefetched(split, batches, device) if name == "prefetched" else resident)
            times[name].append(total / steps)
            if name == "prefetched":
                host_wait.append(waited / steps)
    real, ideal = statistics.median(times["prefetched"]), statistics.median(times["resident"])
    return {"batch": s["batch"], "image": list(c.image_shape), "steps": steps, "reader": "mixer.engine.prefetched",
            "step_ms_prefetched": real * 1e3, "step_ms_resident": ideal * 1e3,
            "data_wait_share": max(0.0, (real - ideal) / real),
            "host_ms_in_reader_per_step": statistics.median(host_wait) * 1e3}


# ---- host syncs ----------------------------------------------------------------------------------

class _StepMark(Reporter):
    """Remembers the optimizer step the loop is at, so each sync is counted against the step it follows."""

    def __init__(self):
        self.now = 0

    def step(self, state) -> None:
        self.now = state.step


@contextlib.contextmanager
def _cuda_syncs(events: list, mark: _StepMark):
    """Each synchronizing CUDA call, by torch.cuda.set_sync_debug_mode("warn"): its warning, counted."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def seen(message, *args, **kwargs):
            if "synchroniz" in str(message):
                events.append(mark.now)
            else:
                shown(message, *args, **kwargs)

        warnings.showwarning = seen
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _host_reads(events: list, mark: _StepMark):
    """On the CPU nothing waits: count the host's reads of tensors, as tests/test_syncs.py does (leaving out
    torch.optim's reads of its step counters, which stay on the host on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads and not any("/torch/optim/" in f.filename for f in traceback.extract_stack()):
                events.append(mark.now)
            return func(*args, **(kwargs or {}))

    return Reads()


def syncs(c: MixerConfig, split: Split, s: dict, device: torch.device, folder: Path) -> dict:
    """Syncs per optimizer step inside an epoch of mixer.engine.train: those after step 1 and before the last
    (the start and the epoch's end, which evaluates and checkpoints, are left out)."""
    torch.manual_seed(0)
    n = min(len(split), s["sync_images"])
    train_split = Split(split.images[:n], split.labels[:n], split.paths[:n], split.classes)
    val = Split(split.images[:s["batch"]], split.labels[:s["batch"]], split.paths[:s["batch"]], split.classes)
    config = TrainConfig(epochs=1, batch_size=s["batch"], warmup_epochs=0, eval_batch_size=s["batch"],
                         augment=AugmentConfig(crop_scale=(0.6, 1.0), crop_ratio=(0.8, 1.25)))  # params.yaml's
    mark, events = _StepMark(), []
    if device.type == "cuda":
        counting, how = _cuda_syncs(events, mark), 'torch.cuda.set_sync_debug_mode("warn")'
    else:
        counting, how = _host_reads(events, mark), "host reads of tensors (as tests/test_syncs.py counts them)"
    with counting:
        result = train(MlpMixer(c), train_split, val, config, Preprocessing(), folder, {"gpu_check": "syncs"},
                       Machine(log_every=50), False, mark)
    steps = result.state.step
    inside = [k for k in events if 1 <= k < steps]
    by_step = {str(k): events.count(k) for k in sorted(set(events))}
    return {"counted_by": how, "optimizer_steps": steps, "log_every": 50, "syncs_inside_epoch": len(inside),
            "steps_inside_epoch": max(steps - 1, 0), "syncs_per_step": len(inside) / max(steps - 1, 1),
            "by_step": by_step}


# ---- predict -------------------------------------------------------------------------------------

def predict(s: dict, folder: Path) -> dict:
    from PIL import Image

    from mixer.checkpoint import save_model
    from mixer.model import create_model

    images = folder / "images"
    images.mkdir()
    side = s["predict_side"]
    y, x = np.mgrid[0:side, 0:side]
    rng = np.random.default_rng(0)
    for i in range(s["predict_images"]):
        base = (np.sin(x / (8 + i % 17)) + np.cos(y / (6 + i % 13))) * 60 + 128
        pixels = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (side, side, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(images / f"{i:05d}.jpg", quality=85)
    torch.manual_seed(0)
    image = 32 if side <= 32 else 64
    save_model(create_model(image_shape=(image, image), patch_shape=(8, 8), depth=2, dim=64, num_classes=10),
               folder / "model")
    workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    cmd = [sys.executable, "-m", "pipeline.cli", "predict", str(images), "--model", str(folder / "model"),
           "--out", str(folder / "predictions.csv"), "--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"mixer predict failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    rows = len((folder / "predictions.csv").read_text().splitlines()) - 1
    return {"images": s["predict_images"], "image_files": f"{side}x{side} JPEG", "model": f"{image}x{image}, "
            "patch 8, depth 2, dim 64 (untrained)", "workers": workers, "rows_written": rows, "seconds": seconds,
            "images_per_s": s["predict_images"] / seconds,
            "model_device": "cpu (mixer predict has no device option: it runs on the CPU on any machine)"}


# ---- the run -------------------------------------------------------------------------------------

def table(report: dict) -> str:
    lines = []
    env = report["environment"]
    lines.append(f"device {env.get('device')} ({', '.join(env.get('gpus') or []) or 'no GPU'}), torch "
                 f"{env.get('torch')}, reference: {env.get('reference')}{', DRY RUN' if env.get('dry_run') else ''}")
    t = report["tests"]
    lines.append(f"tests        {t.get('summary', t.get('error'))}")
    p = report["peak"]
    lines.append(f"peak         bf16 GEMM {p['tflops']:.1f} TFLOP/s" if "tflops" in p else f"peak         {p['error']}")
    lines.append(f"{'train step':12s} {'':5s} {'ours ms':>8s} {'ref ms':>8s} {'ours img/s':>11s} {'ours MFU':>9s} "
                 f"{'ref MFU':>8s} {'ours GiB':>9s} {'ref GiB':>8s} {'speedup':>8s}")
    for (variant, v) in report["train_step"].items():
        if "error" in v:
            lines.append(f"{'':12s} {variant:5s} {v['error']}")
            continue
        o, r = v["ours"], v["reference"]
        gib = lambda m: "-" if m is None else f"{m:.2f}"  # noqa: E731
        lines.append(f"{'':12s} {variant:5s} {o['step_ms']:8.2f} {r['step_ms']:8.2f} {o['images_per_s']:11.0f} "
                     f"{o['mfu']:9.3f} {r['mfu']:8.3f} {gib(o['peak_memory_gib']):>9s} {gib(r['peak_memory_gib']):>8s} "
                     f"{v['speedup']:7.2f}x")
    d = report["data_wait"]
    lines.append(f"data wait    {d['data_wait_share']:.1%} of a step (prefetched {d['step_ms_prefetched']:.2f} ms, "
                 f"on device {d['step_ms_resident']:.2f} ms)" if "data_wait_share" in d else f"data wait    {d['error']}")
    y = report["syncs"]
    lines.append(f"host syncs   {y['syncs_per_step']:.2f} per step ({y['syncs_inside_epoch']} in "
                 f"{y['steps_inside_epoch']} steps; {y['counted_by']})" if "syncs_per_step" in y
                 else f"host syncs   {y['error']}")
    q = report["predict"]
    lines.append(f"predict      {q['images']} images in {q['seconds']:.1f} s: {q['images_per_s']:.0f} images/s "
                 f"(on the CPU)" if "seconds" in q else f"predict      {q['error']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes: every code path but the device")
    parser.add_argument("--skip-tests", action="store_true", help="leave out `pytest -m gpu`")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run to try it on the CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    s = sizes(args.dry_run)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as a real run would (bf16 autocast anyway)
    report: dict = {k: {} for k in SECTIONS}
    failed = False
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))

    def section(name, fn):
        nonlocal failed
        started = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            value = fn()
        except Exception as exc:  # one section's failure leaves the others their figures
            failed = True
            value = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                     "traceback": traceback.format_exc()[-2000:]}
        if isinstance(value, dict) and "seconds" not in value:
            value["section_seconds"] = time.perf_counter() - started
        report[name] = value
        return value

    try:
        section("environment", lambda: environment(device, args.dry_run))
        if args.skip_tests:
            report["tests"] = {"skipped": "--skip-tests"}
        else:
            tested = section("tests", tests)
            failed |= tested.get("returncode", 1) != 0
        peak = section("peak", lambda: {"tflops": matmul_peak(device, torch.bfloat16, n=s["gemm"], repeats=10) / 1e3,
                                        "gemm": f"{s['gemm']}x{s['gemm']} bf16 torch.matmul"})
        peak_tflops = peak.get("tflops") or float("nan")
        for (variant, fields) in s["variants"].items():
            c = MixerConfig(image_shape=(s["image"], s["image"]), num_classes=s["classes"], **fields)
            report["train_step"][variant] = {}
            try:
                report["train_step"][variant] = step_timing(c, s, device, peak_tflops)
            except Exception as exc:
                failed = True
                report["train_step"][variant] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        small = MixerConfig(image_shape=(s["image"], s["image"]), num_classes=s["classes"], **s["variants"]["S/16"])
        cache = {}

        def split():
            if "split" not in cache:
                (scratch / "cache").mkdir(exist_ok=True)
                cache["split"] = memmap_cache(scratch / "cache", s["cache_images"], s["image"], s["classes"])
            return cache["split"]

        section("data_wait", lambda: data_wait(small, split(), s, device))
        section("syncs", lambda: syncs(small, split(), s, device, scratch / "run"))
        (scratch / "predict").mkdir()
        section("predict", lambda: predict(s, scratch / "predict"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
