"""The training data path alone, and whether the loop hides it behind the step.

    python benchmarks/data_path.py [--size 224] [--images 2048] [--batch 64] [--slow 0.05]

1. The data path of one micro-batch, without a model: gather rows from a memory-mapped cache (as
   prepared/ is), copy to the training device and convert uint8 → float in [0, 1]. Images per second
   on one thread (`torch.set_num_threads(1)`): per core.
2. Overlap: the step of a small Mixer with a reader slowed down on purpose by `--slow` seconds per
   batch, through `mixer.engine.prefetched` (the loop's reader) and through a plain in-line reader.
   With prefetching the step should take about max(compute, read), in-line their sum.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixer.data import Split
from mixer.engine import prefetched
from mixer.model import create_model


def cache(folder: Path, n: int, size: int) -> np.ndarray:
    images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, 256):
        images[i:i + 256] = rng.integers(0, 255, size=images[i:i + 256].shape, dtype=np.uint8)
    images.flush()
    return np.load(folder / "images.npy", mmap_mode="r")


class Slow(Split):
    """A split whose reads take `delay` seconds more (a slow disk or network file system)."""

    delay = 0.0

    def gather(self, rows, pin=False):
        time.sleep(self.delay)
        return super().gather(rows, pin)


def data_path(split: Split, batch: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for _ in range(repeats):
        images, labels = split.gather(np.sort(rng.choice(len(split), batch, replace=False)))
        split.on_device(images.to("cpu"))
    return repeats * batch / (time.perf_counter() - started)


def steps(split: Split, batches, model, optimizer, ahead: bool) -> float:
    reader = prefetched(split, batches, "cpu") if ahead else (
        (split.on_device(x), y) for (x, y) in (split.gather(rows) for rows in batches))
    started = time.perf_counter()
    for (images, labels) in reader:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - started) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--slow", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        images = cache(Path(folder), args.images, args.size)
        labels = np.arange(args.images) % 10
        split = Split(images, labels, [str(i) for i in range(args.images)], [str(c) for c in range(10)])
        rates = [data_path(split, args.batch, 8) for _ in range(3)]
        print(f"data path (gather + copy + uint8→float) at {args.size}x{args.size}, batch {args.batch}, one thread: "
              f"{statistics.median(rates):.0f} images/s per core (runs: {', '.join(f'{r:.0f}' for r in rates)})")

        small = Split(images[:1024], labels[:1024], split.paths[:1024], split.classes)
        slow = Slow(small.images, small.labels, small.paths, small.classes)
        torch.manual_seed(0)
        model = create_model(image_shape=(args.size, args.size), patch_shape=(32, 32), depth=2, dim=128,
                             num_classes=10)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        batches = [np.arange(i * 16, (i + 1) * 16) for i in range(args.steps)]
        steps(small, batches[:2], model, optimizer, ahead=False)  # warm-up
        results = {}
        for _ in range(3):  # interleaved: each configuration sees the same machine
            for (name, s, delay, ahead) in (("compute only", small, 0.0, False), ("read only", slow, args.slow, None),
                                            ("in line", slow, args.slow, False), ("prefetched", slow, args.slow, True)):
                Slow.delay = delay
                t = args.slow if ahead is None else steps(s, batches, model, optimizer, ahead)
                results.setdefault(name, []).append(t)
        med = {k: statistics.median(v) for (k, v) in results.items()}
        print(f"step with a reader slowed by {args.slow * 1000:.0f} ms per batch (median of 3, ms):")
        for (k, v) in med.items():
            print(f"  {k:13s} {v * 1000:7.1f}")
        print(f"  max(compute, read) {max(med['compute only'], med['read only']) * 1000:.1f}, "
              f"sum {(med['compute only'] + med['read only']) * 1000:.1f}")


if __name__ == "__main__":
    main()
