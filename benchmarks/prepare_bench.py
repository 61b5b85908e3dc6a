"""Prepare throughput with 1 and 2 decoding workers, and peak memory, on generated JPEGs of mixed sizes.

    python benchmarks/prepare_bench.py --images 2000            # images/s for 1 and 2 workers
    python benchmarks/prepare_bench.py --images 20000 --max-side 128 --workers 2   # memory at scale

Each measurement runs in a fresh process; figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n: int, max_side: int = 640, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = min(200, max_side // 2)
        h, w = int(rng.integers(low, max_side)), int(rng.integers(low, max_side))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth, photo-like
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:06d}.jpg", quality=85)


def one_run(folder: str, workers: int, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from mixer.data import PrepareConfig, prepare
    from mixer.sources import scan_folder

    source = scan_folder(Path(folder))
    start = time.perf_counter()
    prepare(source, Path(out), PrepareConfig(image_shape=(256, 256)), workers)
    elapsed = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": len(source.items), "workers": workers, "seconds": elapsed,
                      "images_per_s": len(source.items) / elapsed, "peak_rss_mib_main": own,
                      "peak_rss_mib_worker": children}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--max-side", type=int, default=640, help="largest generated side, in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 1, 2], help="runs, in order")
    parser.add_argument("--one-run", nargs=3, metavar=("FOLDER", "WORKERS", "OUT"))
    args = parser.parse_args()
    if args.one_run:
        one_run(args.one_run[0], int(args.one_run[1]), args.one_run[2])
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "images"
        print(f"generating {args.images} JPEGs of mixed sizes ...", flush=True)
        make_folder(folder, args.images, args.max_side)
        results = {}
        for workers in args.workers:  # by default interleaved, best of two each
            line = subprocess.run([sys.executable, __file__, "--one-run", str(folder), str(workers),
                                   str(Path(scratch) / f"out{workers}")], capture_output=True, text=True, check=True)
            r = json.loads(line.stdout.strip().splitlines()[-1])
            if workers not in results or r["images_per_s"] > results[workers]["images_per_s"]:
                results[workers] = r
        for r in results.values():
            print(f"workers {r['workers']}: {r['images_per_s']:.0f} images/s, peak RSS main "
                  f"{r['peak_rss_mib_main']:.0f} MiB, largest worker {r['peak_rss_mib_worker']:.0f} MiB")
        if {1, 2} <= set(results):
            print(f"speed-up with 2 workers: {results[2]['images_per_s'] / results[1]['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
