"""`mixer predict` on a folder of photo-sized JPEGs: images/s with 1 and 2 decoding workers, peak RSS.

    python benchmarks/predict_bench.py --images 2000 --rounds 2

The images are 500x375 JPEGs (smooth gradients plus noise, about 40 KB each, like photos after
compression); the model is an untrained 64x64 Mixer (patch 8, depth 2, dim 64), so the figure is
the pipeline (listing, decoding, batching, writing the CSV), not a large model. Arms alternate
(1 2, 2 1, ...). Two figures: the whole command, and the marginal rate once started,
(N - N/10) / (t(N) - t(N/10)), which leaves out the interpreter's and torch's start-up (about 2 s,
the same for any N). Printed, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUN = """
import resource, sys
sys.path.insert(0, {root!r})
sys.argv = ["mixer", "predict", {folder!r}, "--model", {model!r}, "--workers", {workers!r}, "--out", {out!r}]
from pipeline.cli import main
try:
    main()
except SystemExit as exc:
    if exc.code:
        raise
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, file=sys.stderr)
"""


def make_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    for i in range(n):
        base = (np.sin(x / (20 + i % 17)) + np.cos(y / (15 + i % 13))) * 60 + 128
        pixels = np.stack([base, base[::-1], base[:, ::-1]], axis=-1) + rng.normal(0, 12, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mixer.checkpoint import save_model
    from mixer.model import create_model

    scratch = Path(tempfile.mkdtemp(prefix="predict_bench-"))
    try:
        (scratch / "photos").mkdir()
        make_images(scratch / "photos", args.images)
        size = sum(p.stat().st_size for p in (scratch / "photos").iterdir()) / args.images / 1024
        save_model(create_model(image_shape=(64, 64), patch_shape=(8, 8), depth=2, dim=64, num_classes=10),
                   scratch / "model")
        (scratch / "few").mkdir()
        few = args.images // 10
        for path in sorted((scratch / "photos").iterdir())[:few]:
            (scratch / "few" / path.name).symlink_to(path)
        rates: dict[int, list[float]] = {1: [], 2: []}
        marginal: dict[int, list[float]] = {1: [], 2: []}
        rss: dict[int, str] = {}

        def timed(folder: str, workers: int) -> tuple[float, str]:
            code = RUN.format(root=str(ROOT), folder=str(scratch / folder), model=str(scratch / "model"),
                              workers=str(workers), out=str(scratch / "p.csv"))
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            return time.perf_counter() - start, done.stderr

        for r in range(args.rounds):
            for workers in ((1, 2) if r % 2 == 0 else (2, 1)):
                seconds, stderr = timed("photos", workers)
                small, _ = timed("few", workers)
                rates[workers].append(args.images / seconds)
                marginal[workers].append((args.images - few) / (seconds - small))
                main_mib, child_mib = stderr.split("RSS")[-1].split()
                rss[workers] = f"main {main_mib} MiB, largest worker {child_mib} MiB"
        print(f"{args.images} JPEGs of 500x375 ({size:.0f} KB each), {args.rounds} runs per arm:")
        for workers in (1, 2):
            print(f"  --workers {workers}: whole command {statistics.median(rates[workers]):.0f} images/s, "
                  f"once started {statistics.median(marginal[workers]):.0f} images/s "
                  f"({min(marginal[workers]):.0f}-{max(marginal[workers]):.0f}); peak RSS {rss[workers]}")
        print(f"  2 workers / 1: whole command {statistics.median(rates[2]) / statistics.median(rates[1]):.2f}x, "
              f"once started {statistics.median(marginal[2]) / statistics.median(marginal[1]):.2f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
