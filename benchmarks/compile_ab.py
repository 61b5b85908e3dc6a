"""torch.compile on the real loop: whole `mixer train` runs of the committed params.yaml (the digits),
with and without `--compile` (Machine(compile=True)), compile time included, interleaved (A B, B A, ...).

    python benchmarks/compile_ab.py [--rounds 2] [--epochs N]

Each run is the command itself in a fresh process, on data prepared once: its wall time (start-up,
compilation, every epoch, evaluation and checkpoints), the steady images/s of the epochs after the
first, and the final val accuracy (the two arms should agree to rounding). The ratio is
median(plain wall) / median(compiled wall), and per round (a shared machine's load changes between
rounds; `load_after` is the 1-minute load average after each run): above 1, compiling wins.
Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = "import sys; sys.path.insert(0, {root!r}); sys.argv = ['mixer'] + {args!r}; import pipeline.cli; pipeline.cli.main()"


THREADS: dict = {}  # OMP_NUM_THREADS for the runs (--threads), else torch's default (one per core)


def mixer(args: list[str], project: Path) -> subprocess.CompletedProcess:
    code = CLI.format(root=str(ROOT), args=args)
    return subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                          env={**os.environ, **THREADS})


def run(project: Path, compile: bool, epochs: int | None, label: str) -> dict:
    args = ["train", "--no-progress", "--no-resume", "--output-dir", f"out-{label}",
            "--compile" if compile else "--no-compile"] + (["--num-steps", str(epochs)] if epochs else [])
    started = time.perf_counter()
    done = mixer(args, project)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[-3000:], "wall_s": wall}
    plots = project / "reports" / "train" / "plots" / "metrics"
    rates = [float(line.split("\t")[-1]) for line in (plots / "images_per_second.tsv").read_text().splitlines()[1:]]
    accuracy = [float(line.split("\t")[-1]) for line in (plots / "val" / "accuracy.tsv").read_text().splitlines()[1:]]
    return {"wall_s": wall, "load_after": round(os.getloadavg()[0], 2), "first_epoch_images_per_s": rates[0],
            "steady_images_per_s": statistics.median(rates[1:]) if len(rates) > 1 else rates[0],
            "val_accuracy": accuracy[-1], "epochs": len(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's num_steps")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS); on a machine others load, 1 keeps OpenMP's "
                             "threads from waiting on each other")
    args = parser.parse_args()
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="compile_ab-"))
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        prepared = mixer(["prepare", "--workers", "1"], scratch)
        if prepared.returncode != 0:
            raise SystemExit(f"prepare failed:\n{prepared.stderr}")
        results: dict[str, list[dict]] = {"plain": [], "compiled": []}
        for r in range(args.rounds):
            for arm in (("plain", "compiled") if r % 2 == 0 else ("compiled", "plain")):
                result = run(scratch, arm == "compiled", args.epochs, arm)
                results[arm].append(result)
                shown = {k: (round(v, 4) if isinstance(v, float) else v) for (k, v) in result.items() if k != "error"}
                print(f"round {r + 1} {arm:8s} {shown}", flush=True)
                if "error" in result:
                    print(f"  {arm} failed:\n{result['error']}", flush=True)
        ok = {arm: [x for x in runs if "error" not in x] for (arm, runs) in results.items()}
        if not ok["plain"] or not ok["compiled"]:
            raise SystemExit("an arm failed; see above")
        wall = {arm: statistics.median(x["wall_s"] for x in runs) for (arm, runs) in ok.items()}
        steady = {arm: statistics.median(x["steady_images_per_s"] for x in runs) for (arm, runs) in ok.items()}
        print(f"\nwhole default run (digits, {ok['plain'][0]['epochs']} epochs, threads "
              f"{args.threads or 'default'}), median of {args.rounds} per arm:")
        for arm in ok:
            walls = ", ".join("%.1f" % x["wall_s"] for x in ok[arm])
            print(f"  {arm:8s} wall {wall[arm]:7.1f} s ({walls}); "
                  f"steady {steady[arm]:7.0f} img/s; first epoch "
                  f"{statistics.median(x['first_epoch_images_per_s'] for x in ok[arm]):7.0f} img/s; "
                  f"val acc {', '.join('%.4f' % x['val_accuracy'] for x in ok[arm])}")
        paired = [p["wall_s"] / c["wall_s"] for (p, c) in zip(results["plain"], results["compiled"])
                  if "error" not in p and "error" not in c]
        print(f"  per-round plain/compiled wall: {', '.join('%.3f' % x for x in paired)} (the same round saw "
              "much the same machine)")
        print(f"  ratio plain/compiled wall {wall['plain'] / wall['compiled']:.3f}x; steady images/s "
              f"compiled/plain {steady['compiled'] / steady['plain']:.3f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
