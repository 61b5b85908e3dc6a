"""Fine-tuning at the checkpoint's resolution vs at twice it (the token mixing expanded as the paper's
Appendix C), from a hub-layout Mixer in an offline cache, on real images, on a CPU.

The checkpoint: a Mixer pretrained here on the digits 0-4 at 6x6 (patch 2: a 3x3 grid), written as a
hub repository (config.json with timm's pretrained_cfg, model.safetensors) in a huggingface_hub cache
read with HF_HUB_OFFLINE=1. The fine-tune: the digits 5-9 (8x8 originals), with presets/finetune.yaml
as the base, at 6x6 (its own size: the digits lose detail) and at 12x12 (its grid times 2: the
token-mixing weights expanded block-diagonally), each with and without layer_decay, over seeds. Every
run is `mixer prepare`, `mixer train`, `mixer evaluate` in a fresh project folder; the figure is the
test accuracy of reports/metrics.json.

    python benchmarks/finetune_resolution.py --epochs 10 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
REPO, COMMIT = "bench/mixer-digits-6", "c" * 40


def digits_folder(root: Path, classes: range) -> Path:
    digits = load_digits()
    for (i, (image, label)) in enumerate(zip(digits.images, digits.target)):
        if label in classes:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype(np.uint8)).save(root / str(label) / f"{i:04d}.png")
    return root


def mixer(project: Path, *args: str, env: dict) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=project, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"mixer {' '.join(args)} failed in {project}:\n{result.stdout}\n{result.stderr}")


def run(project: Path, params: dict, env: dict) -> float:
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("prepare", "train", "evaluate"):
        mixer(project, stage, env=env)
    return json.loads((project / "reports" / "metrics.json").read_text())["accuracy"]


def pretrain(work: Path, hf_home: Path, epochs: int, env: dict) -> None:
    """The checkpoint, in huggingface_hub's offline layout."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {**base, "dataset": str(digits_folder(work / "pretrain-data", range(0, 5))), "image_shape": [6, 6],
              "patch_shape": [2, 2], "depth": 4, "dim": 64, "num_steps": epochs}
    accuracy = run(work / "pretrain", params, env)
    print(f"checkpoint: digits 0-4 at 6x6, test accuracy {accuracy:.4f}")
    snapshot = hf_home / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    shutil.copy(work / "pretrain" / "output" / "model.safetensors", snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "mixer_digits", "num_classes": 5,
                                                      "pretrained_cfg": {"input_size": [3, 6, 6], "mean": [0.5] * 3,
                                                                         "std": [0.5] * 3}}))
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--layer-decay", type=float, default=0.75)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        pretrain(work, work / "hf", args.pretrain_epochs, env)
        data = digits_folder(work / "finetune-data", range(5, 10))
        base = yaml.safe_load((ROOT / "presets" / "finetune.yaml").read_text())
        base.update(dataset=str(data), checkpoint=f"hf-hub:{REPO}", num_steps=args.epochs, warmup_step=1,
                    batch_size=32, lr=0.01, hflip=0.0, crop_scale=[0.6, 1.0], eval_batch_size=256)
        arms = {(shape, decay): [] for shape in (6, 12) for decay in (1.0, args.layer_decay)}
        for seed in args.seeds:
            for (shape, decay) in arms:
                params = {**base, "image_shape": [shape, shape], "layer_decay": decay, "seed": seed}
                arms[(shape, decay)].append(run(work / f"ft-{shape}-{decay}-{seed}", params, env))
        print(f"\nfine-tuned on the digits 5-9, {args.epochs} epochs, seeds {args.seeds} "
              "(presets/finetune.yaml; batch 32, lr 0.01, no flip, crop_scale [0.6, 1])")
        print("| image_shape | token mixing | layer_decay | test accuracy (mean) | per seed |")
        print("| --- | --- | --- | --- | --- |")
        for ((shape, decay), scores) in arms.items():
            how = "its own (3x3 grid)" if shape == 6 else "expanded 2x (6x6 grid, 4 blocks)"
            print(f"| {shape}x{shape} | {how} | {decay:g} | {statistics.mean(scores):.4f} | "
                  f"{', '.join(f'{s:.4f}' for s in scores)} |")


if __name__ == "__main__":
    main()
