"""Shared helpers: the repository root, small image folders, params files with overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, settings
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# A failsafe, never a measure: a test or a process it waits for is stopped after this long only if it
# hangs. Far above a slow run on a machine at load 17 (the suite's slowest test takes minutes there).
HANG = 1800
# Hypothesis' own clocks (a deadline per example, the too-slow health check) are wall-clock verdicts too.
settings.register_profile("any-load", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("any-load")
# `mixer export` needs the onnx extra; without it (`pip install -e ".[test]"`) its tests are skipped, not failed
def _have_onnx() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


needs_onnx = pytest.mark.skipif(not _have_onnx(), reason="needs the onnx extra: pip install -e '.[test,onnx]'")


def write_params(path: Path, **overrides) -> Path:
    """The committed params.yaml with some keys changed."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if "data" in overrides:  # the key's old name, still used by tests written before the rename
        overrides["dataset"] = overrides.pop("data")
    params.update(overrides)
    path.write_text(yaml.safe_dump(params))
    return path


def make_image_folder(root: Path, classes: dict[str, int], size=(10, 12), seed: int = 0) -> Path:
    """One sub-folder per class, each with n distinct random PNGs."""
    rng = np.random.default_rng(seed)
    for (name, n) in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:03d}.png")
    return root


def make_project(root: Path, **overrides) -> Path:
    """A working folder whose params.yaml points at a small image folder (3 classes of 12 8×8 images) to be
    prepared at 8×8 in 2 epochs; `overrides` change more keys."""
    make_image_folder(root / "images", {"a": 12, "b": 12, "c": 12}, size=(8, 8))
    write_params(root / "params.yaml", data=str(root / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3, num_steps=2, **overrides)
    return root


def only_run(root: Path) -> Path:
    """The one run folder (12 hex characters, mixer.train_state.run_key) under checkpoints/<output_dir>."""
    from mixer.train_state import KEY

    (folder,) = [p for p in root.iterdir() if p.is_dir() and KEY.fullmatch(p.name)]
    return folder


def git_env() -> dict:
    env = dict(os.environ)
    env.update(GIT_AUTHOR_NAME="Test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="Test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def read_until(process: subprocess.Popen, text: str, seen: list[str]) -> str:
    """Read a running process's output until a line holds `text`; every line read is kept in `seen`."""
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return line
    raise AssertionError(f"the process ended before printing {text!r}:\n{''.join(seen)}")


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = HANG) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env or git_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images", {"cat": 12, "dog": 12, "fox": 12})


def make_photo_folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """Photo-like images a model can learn: JPEGs and PNGs of varied sizes, each class its own colour and
    stripe direction under noise."""
    rng = np.random.default_rng(seed)
    for (c, (name, n)) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = int(rng.integers(20, 48)), int(rng.integers(20, 48))
            base = np.zeros((h, w, 3))
            base[..., c % 3] = 180
            stripes = (np.arange(w)[None, :] if c % 2 else np.arange(h)[:, None]) // 3 % 2 * 60
            pixels = np.clip(base + stripes[..., None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"photo{i:03d}.{'jpg' if i % 2 else 'png'}")
    return root
