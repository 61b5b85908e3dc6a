"""Training throughput of the real `mixer train` loop, arms interleaved in one run (A B C, C B A, ...).

Each arm is a code tree (this checkout, or a git revision checked out into a scratch worktree),
with or without glibc's keep-freed-memory setting (`pipeline/allocator.py`) and, for trees that
still have it, the fused block on or off. Every arm trains the same prepared data with the same
params; the figure is the median images/s of the epochs after the first (the first warms up).

    python benchmarks/train_ab.py --arm new:.:plain:keep --arm old:HEAD~1:fused:default \
        --config both --rounds 4 --epochs 3

Printed, never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # the committed params.yaml on the embedded digits
    "default": dict(),
    # the original train.py defaults on random 256x256 images of 3 classes
    "original": dict(image_shape=[256, 256], patch_shape=[16, 16], depth=6, dim=512, num_classes=3,
                     batch_size=16, optimizer="sgd", lr=1.0e-3, decay=0.0, warmup_step=1,
                     crop_scale=[0.08, 1.0], crop_ratio=[0.75, 1.3333], hflip=0.5, eval_batch_size=64),
}
SETUP = """
import sys
sys.path.insert(0, {tree!r})
if {keep}:
    from pipeline.allocator import keep_freed_memory
    keep_freed_memory()
try:
    import mixer.fused as fused
    fused.enabled = {fused}
except ImportError:
    pass
import pipeline.cli as cli
if {keep} is False and hasattr(cli, "keep_freed_memory"):
    cli.keep_freed_memory = lambda: False
sys.argv = ["mixer", "train", "--no-progress", "--num-steps", {epochs!r}]
cli.main()
"""


def make_project(scratch: Path, config: str, tree: Path) -> Path:
    """A working directory with params for `config`, prepared by `tree`'s own code (formats may differ)."""
    project = scratch / f"{config}-{tree.name}"
    project.mkdir()
    params = yaml.safe_load((tree / "params.yaml").read_text())  # the tree's own keys (they change)
    params.update(CONFIGS[config])
    if "num_classes" in CONFIGS[config] or params.get("num_classes") is None:
        params["num_classes"] = CONFIGS[config].get("num_classes", 10 if config == "default" else 3)
    if config == "original":
        rng = np.random.default_rng(0)
        for label in ("a", "b", "c"):
            (project / "images" / label).mkdir(parents=True)
            for i in range(40):
                Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
                    project / "images" / label / f"{i}.png")
        params.update({"dataset" if "dataset" in params else "data": str(project / "images"), "val_fraction": 0.1,
                       "test_fraction": 0.1})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); sys.argv = ['mixer', 'prepare']; " \
           "import pipeline.cli; pipeline.cli.main()"
    subprocess.run([sys.executable, "-c", code], cwd=project, check=True, capture_output=True)
    return project


def checkout(rev: str, scratch: Path) -> Path:
    if rev == ".":
        return ROOT
    tree = scratch / f"tree-{re.sub(r'[^A-Za-z0-9]', '_', rev)}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)
    return tree


def run_arm(project: Path, tree: Path, fused: str, keep: str, epochs: int) -> list[float]:
    code = SETUP.format(tree=str(tree), keep=keep == "keep", fused=fused != "plain", epochs=str(epochs))
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"arm {tree} failed:\n{out.stdout}\n{out.stderr}")
    tsv = project / "reports" / "train" / "plots" / "metrics" / "images_per_second.tsv"
    rates = [float(line.split("\t")[-1]) for line in tsv.read_text().splitlines()[1:]]
    return rates[1:]  # the first epoch warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True,
                        help="label:REV:fused|plain:keep|default (REV '.' is this checkout)")
    parser.add_argument("--config", choices=["default", "original", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    arms = [a.split(":") for a in args.arm]
    scratch = Path(tempfile.mkdtemp(prefix="train_ab-"))
    trees: dict[str, Path] = {}
    try:
        trees = {rev: checkout(rev, scratch) for (_, rev, _, _) in arms}
        for config in (["default", "original"] if args.config == "both" else [args.config]):
            projects = {rev: make_project(scratch, config, tree) for (rev, tree) in trees.items()}
            rates: dict[str, list[float]] = {label: [] for (label, *_) in arms}
            ratios: dict[str, list[float]] = {label: [] for (label, *_) in arms}  # per round, vs the first arm
            for r in range(args.rounds):
                this_round = {}
                for (label, rev, fused, keep) in (arms if r % 2 == 0 else arms[::-1]):
                    this_round[label] = run_arm(projects[rev], trees[rev], fused, keep, args.epochs)
                    rates[label] += this_round[label]
                for label in ratios:
                    ratios[label].append(statistics.median(this_round[label]) / statistics.median(this_round[arms[0][0]]))
            print(f"\n{config}: images per second, epochs 2..{args.epochs} of {args.rounds} runs per arm; ratio to "
                  f"{arms[0][0]}: median of per-round ratios (quartiles)")
            for (label, rev, fused, keep) in arms:
                q = statistics.quantiles(ratios[label], n=4) if len(ratios[label]) > 1 else [ratios[label][0]] * 3
                print(f"  {label:12s} {rev:10s} {fused:6s} malloc {keep:8s} median {statistics.median(rates[label]):8.2f} "
                      f"({min(rates[label]):.2f}-{max(rates[label]):.2f})  ratio {statistics.median(ratios[label]):.3f} "
                      f"({q[0]:.3f}-{q[2]:.3f})")
    finally:
        for tree in {t for t in trees.values() if t != ROOT}:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
