"""A recipe over seeds: test accuracy and loss of the last epoch's and the best val epoch's weights, and
scikit-learn's SVC() on the same splits, per seed and as a mean with its range.

Each (recipe, seed) is a fresh project in a scratch folder: `mixer prepare` and `mixer train` with the
committed params.yaml, the recipe's changes and `seed` (which also draws the split, so each seed is
another split, the same for every recipe and for SVC). Both models of a run are scored on its test
split: the delivered last epoch (output/) and best/ (the epoch of the best val accuracy, which the run
folder keeps whatever `keep` says). Choosing a default by this table reads val, never test: the test
columns are reported, the choice is made on the val column.

    python benchmarks/recipe.py --seeds 0 1 2 3 4                       # the committed params.yaml
    python benchmarks/recipe.py --seeds 0 1 2 3 4 --recipe small16 'image_shape=[16, 16]' 'patch_shape=[4, 4]'
    python benchmarks/recipe.py --seeds $(seq 0 29) --json best-vs-last.json   # the 30-training comparison

Printed, never asserted: one test image of the digits is 0.28 points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def score(model_dir: Path, prepared: Path) -> dict:
    import torch.nn.functional as F

    from mixer.checkpoint import load_model
    from mixer.data import load_split
    from mixer.evaluation import split_logits

    model = load_model(model_dir)
    test = load_split(prepared, "test")
    logits, labels = split_logits(model, test, model.preprocessing, 512)
    return {"accuracy": float((logits.argmax(1) == labels).float().mean()), "loss": float(F.cross_entropy(logits, labels)),
            "images": len(test)}


def svc(prepared: Path) -> float:
    """scikit-learn's SVC() with its defaults on the prepared pixels (scaled to [0, 1]), train split only."""
    from sklearn.svm import SVC

    from mixer.data import load_split

    train, test = load_split(prepared, "train"), load_split(prepared, "test")
    flat = lambda s: np.asarray(s.images[np.arange(len(s))], dtype=np.float32).reshape(len(s), -1) / 255.0
    model = SVC().fit(flat(train), train.labels)
    return float((model.predict(flat(test)) == test.labels).mean())


def one_run(changes: dict, seed: int, threads: int) -> dict:
    mixer = str(Path(sys.executable).parent / "mixer")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params.update(changes, seed=seed)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MIXER_LOCKS": str(work / "locks")}
        started = time.perf_counter()
        for command in (["prepare", "--workers", "1"], ["train", "--no-progress"]):
            run = subprocess.run([mixer, *command], cwd=work, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"mixer {command[0]} failed (seed {seed}):\n{run.stderr[-2000:]}")
        seconds = time.perf_counter() - started
        (folder,) = [p for p in (work / "checkpoints" / params["output_dir"]).iterdir() if p.is_dir()]
        kept = json.loads((work / params["output_dir"] / "config.json").read_text())["kept"]
        best = json.loads((folder / "best" / "config.json").read_text())["kept"]["epoch"]
        assert kept["keep"] == "last", kept  # main() asks for it: output/ is the last epoch, best/ is scored too
        last = score(work / params["output_dir"], work / "prepared")
        return {"seed": seed, "seconds": seconds, "last": last, "best": score(folder / "best", work / "prepared"),
                "best_epoch": best, "epochs": kept["of"], "val_last": kept["val_accuracy"],
                "svc": svc(work / "prepared"), "threads": threads}


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--recipe", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a named recipe: params.yaml with these changes (YAML values); repeatable")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (results depend on it)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    recipes = {"params.yaml": {}}
    for (name, *pairs) in args.recipe:
        recipes[name] = {k: yaml.safe_load(v) for (k, v) in (p.split("=", 1) for p in pairs)}
    rows = {}
    for (name, changes) in recipes.items():
        for seed in args.seeds:
            r = one_run({**changes, "keep": "last"}, seed, args.threads)
            rows.setdefault(name, []).append(r)
            print(f"{name} seed {seed}: last {r['last']['accuracy']:.4f} (loss {r['last']['loss']:.3f}), best/ (epoch "
                  f"{r['best_epoch']} of {r['epochs']}) {r['best']['accuracy']:.4f}, SVC {r['svc']:.4f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    load = os.getloadavg()[0]
    print(f"\n{len(args.seeds)} seeds each, OMP_NUM_THREADS={args.threads}, load average at the end {load:.1f}\n")
    print("| recipe | test acc, last epoch | test acc, best val epoch | test loss, last | SVC() | last − best "
          "(wins/ties/losses) | s per run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (name, runs) in rows.items():
        last = [r["last"]["accuracy"] for r in runs]
        best = [r["best"]["accuracy"] for r in runs]
        diff = [a - b for (a, b) in zip(last, best)]
        record = f"{sum(d > 0 for d in diff)}/{sum(d == 0 for d in diff)}/{sum(d < 0 for d in diff)}"
        print(f"| {name} | {summary(last)} | {summary(best)} | {summary([r['last']['loss'] for r in runs])} | "
              f"{summary([r['svc'] for r in runs])} | {statistics.mean(diff):+.4f} ({record}) | "
              f"{statistics.median(r['seconds'] for r in runs):.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"recipes": recipes, "runs": rows, "load": load}, indent=1))


if __name__ == "__main__":
    main()
