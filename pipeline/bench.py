"""`mixer bench`: throughput, MFU and data wait for the original and the default config, ours vs reference."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mixer.bench import benchmark, data_wait_share, matmul_peak
from mixer.data import Split, load_split
from mixer.errors import MixerError
from mixer.model import MixerConfig, MlpMixer, create_model
from mixer.resources import check_training_memory
from pipeline.params import load_params
from pipeline.paths import PREPARED
from pipeline.train import model_config

ORIGINAL = dict(image_shape=(256, 256), patch_shape=(16, 16), depth=6, dim=512, num_classes=120)


def configs(which: str, params_file: Path) -> dict[str, tuple[MixerConfig, int]]:
    out = {}
    if which in ("original", "both"):
        out["original"] = (create_model(**ORIGINAL).config, 16)
    if which in ("default", "both"):
        p = load_params(params_file)
        out["default"] = (model_config(p, p.num_classes or 10), p.batch_size)  # what training builds
    if not out:
        raise MixerError(f"--config must be original, default or both, got {which!r}")
    return out


def cached_split(c: MixerConfig, scratch: Path) -> Split:
    """The prepared cache when it matches the config, else a memory-mapped cache of random images."""
    try:
        split = load_split(PREPARED, "train")
        if tuple(split.images.shape[1:3]) == c.image_shape:
            return split
    except MixerError:
        pass
    images = np.lib.format.open_memmap(scratch / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(256, *c.image_shape, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    mapped = np.load(scratch / "images.npy", mmap_mode="r")
    return Split(mapped, np.arange(256) % c.num_classes, [""] * 256, [])


def run(which: str, steps: int, as_json: bool, compile: bool, params_file: Path) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" else [])
    with torch.device("meta"):  # the architectures only: no weights allocated before they are known to fit
        sizes = configs(which, params_file)
    for (c, batch) in sizes.values():  # ours and the reference train side by side (SGD)
        check_training_memory(c, batch, optimizer="sgd", models=2 + compile, device=device.type)
    results = []
    for (precision, dtype) in precisions:
        peak = matmul_peak(device, dtype or torch.float32)
        for (name, (c, batch)) in configs(which, params_file).items():
            r = benchmark(c, batch, steps, device, peak, dtype, compile)
            with tempfile.TemporaryDirectory() as scratch:
                r["data_wait_share"] = data_wait_share(MlpMixer(c).to(device), cached_split(c, Path(scratch)),
                                                       batch, max(steps // 2, 3), device)
            r.update(config=name, precision=precision, device=str(device), threads=torch.get_num_threads())
            results.append(r)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        show(results)
    return results


def scaling(steps: int, as_json: bool) -> list[dict]:
    """Training images/s of our model against the number of patches and the depth (dim 256, batch 8)."""
    from mixer.bench import interleaved, train_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for side in (64, 128, 256):
        for depth in (2, 4, 8):
            c = create_model(image_shape=(side, side), patch_shape=(16, 16), depth=depth, dim=256, num_classes=100).config
            t = interleaved({"ours": MlpMixer(c).to(device)}, c, 8, steps, device)["ours"]
            step = float(np.median(t.train_s))
            rows.append({"image": side, "patches": c.num_patches, "depth": depth, "train_images_per_s": 8 / step,
                         "train_gflop_per_image": train_flops(c) / 1e9, "ms_per_image": 1000 * step / 8})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        table = Table(title="training cost vs patches and depth (dim 256, patch 16, batch 8)")
        for column in ("image", "patches", "depth", "train img/s", "ms / image", "GFLOP / image"):
            table.add_column(column, justify="right")
        for r in rows:
            table.add_row(str(r["image"]), str(r["patches"]), str(r["depth"]), f"{r['train_images_per_s']:.1f}",
                          f"{r['ms_per_image']:.1f}", f"{r['train_gflop_per_image']:.2f}")
        Console(width=120).print(table)
    return rows


def show(results: list[dict]) -> None:
    table = Table(title="mixer bench (medians of interleaved steps; ours vs the plain reference)")
    for column in ("config", "precision", "batch", "train img/s", "ref train", "speed-up", "infer img/s",
                   "ref infer", "speed-up", "GFLOP/s", "matmul peak", "MFU", "ref MFU", "data wait", "peak MiB"):
        table.add_column(column, justify="right")
    for r in results:
        ref = r["reference"]
        for (label, o) in ((r["config"], r["ours"]), (f"{r['config']} compiled", r.get("ours_compiled"))):
            if o is None:
                continue
            table.add_row(label, r["precision"], str(r["batch"]), f"{o['train_images_per_s']:.1f}",
                          f"{ref['train_images_per_s']:.1f}",
                          f"{o['train_images_per_s'] / ref['train_images_per_s']:.2f}×",
                          f"{o['infer_images_per_s']:.1f}", f"{ref['infer_images_per_s']:.1f}",
                          f"{o['infer_images_per_s'] / ref['infer_images_per_s']:.2f}×", f"{o['train_gflops']:.0f}",
                          f"{r['peak_gflops']:.0f}", f"{o['mfu']:.0%}", f"{ref['mfu']:.0%}",
                          f"{r['data_wait_share']:.1%}", f"{r['peak_memory_mib']:.0f}")
    Console(width=220).print(table)
    if any(r.get("compile_warmup_s") for r in results):
        print("torch.compile warm-up: " + ", ".join(f"{r['config']} {r['compile_warmup_s']:.0f} s"
                                                    for r in results if r.get("compile_warmup_s")))
