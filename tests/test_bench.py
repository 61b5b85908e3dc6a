"""The benchmark's pieces: the reference computes our function; FLOPs follow the architecture."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from mixer.bench import ReferenceMixer, forward_flops
from mixer.model import create_model
from pipeline.cli import app


def test_reference_computes_the_same_function():
    model = create_model(image_shape=(16, 24), patch_shape=(4, 4), depth=2, dim=32, num_classes=5)
    torch.nn.init.normal_(model.head.weight)
    reference = ReferenceMixer(model.config).load_from(model)
    x = torch.randn(3, 3, 16, 24)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_forward_flops_counts_every_matmul():
    c = create_model(image_shape=(32, 32), patch_shape=(8, 8), depth=3, dim=64, num_classes=10).config
    s, din = 16, 3 * 8 * 8
    expected = 2 * (s * din * 64 + 3 * (64 * 2 * s * 32 + s * 2 * 64 * 256) + 64 * 10)
    assert forward_flops(c) == expected


def test_bench_cli_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from conftest import write_params

    write_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(app, ["bench", "--config", "default", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output[result.output.index("["):])
    assert row["max_abs_difference"] < 1e-4  # the model timed is the reference's function, with a nonzero head
    assert row["speedup_train"] > 0 and 0 <= row["data_wait_share"] <= 1
    assert row["ours"]["train_images_per_s"] > 0 and row["reference"]["train_images_per_s"] > 0
    assert CliRunner().invoke(app, ["bench", "--config", "huge"]).exit_code == 2
