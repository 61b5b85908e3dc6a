"""Two writers of one place at once: the second stops at once, naming the first; the outputs are the first's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ROOT, make_image_folder, needs_onnx, write_params
from mixer.data import open_prepared
from pipeline.cli import app
from pipeline.outputs import REPORT, Plan, Target, writing

MIXER = str(Path(sys.executable).parent / "mixer")


@pytest.fixture
def project(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "one", {"a": 30, "b": 30}, size=(32, 32), seed=1)
    make_image_folder(tmp_path / "two", {"x": 10, "y": 10, "z": 10}, size=(8, 8), seed=2)
    write_params(tmp_path / "params.yaml", data=str(tmp_path / "one"), image_shape=[32, 32], patch_shape=[4, 4],
                 num_classes=None, depth=1, dim=16, warmup_step=0, batch_size=8)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def start_held(args: list[str], cwd: Path, hold: Path) -> subprocess.Popen:
    """A `mixer` command that stops, holding its locks, right after making its staging (tests/hooks)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "hooks"), MIXER_TEST_HOLD_STAGING=str(hold))
    hold.mkdir()
    process = subprocess.Popen([MIXER, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    while not (hold / "held").exists():
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.01)
    return process


def release(process: subprocess.Popen, hold: Path) -> int:
    (hold / "release").write_text("")
    return process.wait(timeout=300)


@pytest.mark.slow
def test_two_prepares_at_once(project):
    first = start_held(["prepare", "--workers", "1"], project, project / "hold")
    second = subprocess.run([MIXER, "prepare", "--data", str(project / "two")], cwd=project, capture_output=True,
                            text=True)
    assert second.returncode == 2
    assert second.stderr.strip() == (f"error: prepared is being written by another mixer prepare (pid {first.pid}); "
                                     "wait for it to finish or stop it")
    assert release(first, project / "hold") == 0, first.stdout.read()
    prepared = open_prepared(project / "prepared")  # whole and consistent, and the first's
    assert prepared.classes == ["a", "b"]
    assert json.loads((project / "reports" / "data.json").read_text())["classes"] == ["a", "b"]


@pytest.mark.slow
def test_two_trains_at_once(project):
    assert subprocess.run([MIXER, "prepare"], cwd=project).returncode == 0
    first = start_held(["train", "--num-steps", "30", "--no-progress"], project, project / "hold")
    for (args, busy) in ((["--num-steps", "1"], "output"), (["--output-dir", "other"], "reports/train")):
        second = subprocess.run([MIXER, "train", "--no-progress", *args], cwd=project, capture_output=True, text=True)
        assert second.returncode == 2
        assert second.stderr.startswith(f"error: {busy} is being written by another mixer train (pid {first.pid})")
    assert release(first, project / "hold") == 0, first.stdout.read()
    config = json.loads((project / "output" / "config.json").read_text())
    assert config["class_names"] == ["a", "b"] and not (project / "other").exists()
    rows = (project / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(rows) == 31  # the header and the first run's 30 epochs, no interleaved second run


@pytest.mark.parametrize(("args", "target"), [
    (["evaluate"], "reports/metrics.json"),
    pytest.param(["export"], "output/model.onnx", marks=needs_onnx),
    (["import-weights", "w.safetensors", "imported"], "imported"),
    (["predict", "one", "--out", "p.csv"], "p.csv"),
])
def test_every_writing_command_respects_the_lock(project, args, target):
    """Held by this process, each command's output stops it at once with the holder's pid."""
    from safetensors.torch import save_file

    from mixer.checkpoint import save_model
    from mixer.model import create_model
    from reference import as_timm, random_weights

    save_file({k: v.contiguous() for (k, v) in as_timm(random_weights(3, (4, 4), 64, 16, 8, 32, 1, 2)).items()},
              str(project / "w.safetensors"))
    model = create_model(image_shape=(32, 32), patch_shape=(4, 4), depth=1, dim=16, num_classes=2)
    model.class_names = ["a", "b"]
    save_model(model, project / "output")
    runner = CliRunner()
    if args[0] == "evaluate":
        assert runner.invoke(app, ["prepare"]).exit_code == 0
    with writing("a test holding the lock", Plan((Target(project / target, REPORT),), places=())):
        result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"is being written by another a test holding the lock (pid {os.getpid()})" in result.output
    assert runner.invoke(app, args).exit_code == 0  # free again
