"""A linear probe (`freeze: features`): features computed once vs the frozen layers run every batch.

    python benchmarks/probe_bench.py --images 2000 --epochs 10 --rounds 2

Trains the head of a random Mixer (default: 64x64 images, patch 8, depth 8, dim 256; a stand-in for
a pretrained checkpoint) on random images with `mixer.engine.train`, once with the features cached
(what `mixer train` does without augmentation) and once without (`Machine(cache_features=False)`),
arms alternating. Prints the whole run's seconds (the feature pass included) and the per-epoch
seconds after it, and their ratios. Printed, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixer.augment import AugmentConfig
from mixer.data import Split
from mixer.engine import Machine, Reporter, TrainConfig, train
from mixer.model import create_model
from mixer.preprocess import Preprocessing


class EpochClock(Reporter):
    def __init__(self):
        self.started, self.ends = time.perf_counter(), []

    def epoch(self, metrics: dict) -> None:
        self.ends.append(time.perf_counter())


def split(n: int, size: int, classes: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.int64)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    return Split(images, labels, [f"{i}.png" for i in range(n)], [str(c) for c in range(classes)])


def one_run(cache: bool, args) -> tuple[float, float]:
    torch.manual_seed(0)
    model = create_model(image_shape=(args.size, args.size), patch_shape=(args.patch, args.patch), depth=args.depth,
                         dim=args.dim, num_classes=10)
    config = TrainConfig(epochs=args.epochs, batch_size=64, warmup_epochs=1,
                     augment=AugmentConfig(), freeze="features")
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as folder:
        train(model, split(args.images, args.size, 10, 0), split(args.images // 10, args.size, 10, 1), config,
              Preprocessing(), Path(folder), {"bench": cache}, Machine(cache_features=cache), False, clock)
    whole = clock.ends[-1] - clock.started
    per_epoch = (clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1)
    return whole, per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(args.rounds):
        for cache in ((True, False) if r % 2 == 0 else (False, True)):
            results[cache].append(one_run(cache, args))
            whole, per_epoch = results[cache][-1]
            print(f"round {r + 1} {'cached' if cache else 'every batch'}: {whole:.2f} s in all, "
                  f"{per_epoch:.3f} s per epoch", flush=True)
    (cw, ce), (uw, ue) = ([statistics.median(x) for x in zip(*results[c])] for c in (True, False))
    print(f"\n{args.images} images, {args.epochs} epochs, {args.size}x{args.size} patch {args.patch} depth {args.depth} "
          f"dim {args.dim}, {torch.get_num_threads()} threads (medians of {args.rounds})")
    print(f"whole run: every batch {uw:.2f} s, cached {cw:.2f} s  -> {uw / cw:.1f}x")
    print(f"per epoch: every batch {ue:.3f} s, cached {ce:.4f} s  -> {ue / ce:.0f}x")


if __name__ == "__main__":
    main()
