"""The `mixer` command: both flag spellings, per-run overrides, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import make_image_folder, write_params
from pipeline.cli import app

ORIGINAL_FLAGS = ["image_shape", "patch_shape", "depth", "dim", "num_classes", "checkpoint", "output_dir",
                  "batch_size", "lr", "momentum", "decay", "num_steps", "warmup_step", "scheduler"]
TINY = ["--depth", "1", "--dim", "16", "--batch-size", "8", "--warmup-step", "0", "--no-progress"]


@pytest.fixture
def runner():
    return CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with params.yaml pointing at a small image folder, prepared at 8×8."""
    make_image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12}, size=(8, 8))
    write_params(tmp_path / "params.yaml", data=str(tmp_path / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3, num_steps=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_help_lists_every_original_flag_in_both_spellings(runner):
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for flag in ORIGINAL_FLAGS:
        assert f"--{flag.replace('_', '-')}" in result.output
        if "_" in flag:
            assert f"--{flag}" in result.output
    assert "original train.py: 256 256" in result.output  # each default is stated


def test_prepare_train_evaluate_with_original_spellings(runner, project):
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    assert json.loads((project / "reports" / "data.json").read_text())["classes"] == ["a", "b", "c"]
    result = runner.invoke(app, ["train", "--image_shape", "8", "8", "--patch_shape", "4", "4", "--num_steps", "1",
                                 "--output_dir", "run1", *TINY])
    assert result.exit_code == 0, result.output
    arch = json.loads((project / "run1" / "config.json").read_text())["architecture"]
    assert (arch["patch_shape"], arch["depth"], arch["dim"]) == ([4, 4], 1, 16)
    assert yaml.safe_load((project / "params.yaml").read_text())["depth"] == 4  # overrides are for one run
    result = runner.invoke(app, ["evaluate", "--output-dir", "run1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and metrics["top5_accuracy"] is None  # 3 classes: no top-5
    for name in ("per_class.csv", "confusion.csv", "README.md", "figures/confusion.png", "figures/mistakes.png",
                 "figures/learning_curves.png"):
        assert (project / "reports" / name).is_file(), name


def test_typer_spellings_work_too(runner, project):
    runner.invoke(app, ["prepare", "--workers", "1"])
    result = runner.invoke(app, ["train", "--image-shape", "8", "8", "--patch-shape", "2", "2", "--num-steps", "1",
                                 "--output-dir", "run2", *TINY])
    assert result.exit_code == 0, result.output
    assert json.loads((project / "run2" / "config.json").read_text())["architecture"]["patch_shape"] == [2, 2]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--depth", "0"], "error: params.yaml: depth must be at least 1, got 0"),
    (["train", "--image-shape", "9", "9"], "error: params.yaml: image_shape [9, 9] is not divisible by patch_shape [2, 2]"),
    (["train", "--scheduler", "step"], "error: params.yaml: scheduler must be 'cosine' or 'linear', got 'step'"),
    (["train", "--params", "missing.yaml"], "error: params file missing.yaml does not exist"),
    (["train", "--mixed-precision", "fp8"], "error: --mixed-precision must be no, bf16 or fp16, got 'fp8'"),
    (["prepare", "--data", "nowhere"], "error: data folder nowhere does not exist"),
    (["evaluate", "--output-dir", "nothing"], "error: model directory nothing does not exist"),
    (["train", "--resume", "--output-dir", "fresh", "--batch-size", "8"], "error: cannot resume: no checkpoint at fresh/checkpoints/last.pt"),
])
def test_bad_values_are_one_line_and_exit_2(runner, project, args, message):
    if args[0] == "train" and "--resume" in args:
        runner.invoke(app, ["prepare", "--workers", "1"])
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == message
    assert "Traceback" not in result.output


def test_a_bad_value_overwrites_nothing(runner, project):
    runner.invoke(app, ["prepare", "--workers", "1"])
    assert runner.invoke(app, ["train", "--num-steps", "1", "--output-dir", "kept", *TINY]).exit_code == 0
    before = (project / "kept" / "model.safetensors").read_bytes()
    cache = (project / "prepared" / "images.npy").read_bytes()
    assert runner.invoke(app, ["train", "--output-dir", "kept", "--lr", "-1"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--val-fraction", "0.9"]).exit_code == 2
    assert runner.invoke(app, ["prepare", "--data", "nowhere"]).exit_code == 2
    assert (project / "kept" / "model.safetensors").read_bytes() == before
    assert (project / "prepared" / "images.npy").read_bytes() == cache


def test_non_numbers_are_rejected_by_the_parser(runner, project):
    result = runner.invoke(app, ["train", "--depth", "six"])
    assert result.exit_code == 2 and "depth" in result.output


def test_fine_tuning_a_checkpoint_with_another_patch_grid_says_why(runner, project):
    from mixer.checkpoint import save_model
    from mixer.model import create_model

    save_model(create_model(image_shape=(8, 8), patch_shape=(4, 4), depth=1, dim=16, num_classes=3), project / "ck")
    runner.invoke(app, ["prepare", "--workers", "1"])
    result = runner.invoke(app, ["train", "--checkpoint", "ck", *TINY])
    assert result.exit_code == 2
    assert "(4 patches)" in result.output and "gives 16" in result.output
    assert "token-mixing weights are tied to the number of patches" in result.output
