"""What `mixer predict` and `mixer import-weights` are asked is done, or refused in one line before any
work: an expansion to an image_shape whose token mixing cannot fit in memory, a format without a file,
a file name saying another format than --format, more labels than classes, more workers than images."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys

import pandas as pd
import pytest
import torch
from pathlib import Path
from typer.testing import CliRunner

import mixer.inference
import mixer.resources as resources
from conftest import ROOT
from mixer.checkpoint import save_model
from mixer.errors import MixerError
from mixer.model import at_image_shape, create_model
from pipeline.cli import app
from test_inference import images, model_dir  # noqa: F401  (fixtures: a 6-class 8x8 model, four image files)
from test_resources import LiveTensors

GiB = 1 << 30


# ---- import-weights: the expanded model's memory, checked before it is built ----------------------

@pytest.mark.parametrize(("shape", "patch", "depth", "dim", "target"), [
    ((8, 8), (2, 2), 2, 16, (16, 16)),   # 2x2: the expanded tensors of both blocks held at once
    ((8, 8), (2, 2), 2, 16, (32, 16)),   # 4x2, not square
    ((8, 8), (2, 2), 1, 16, (48, 48)),   # one block: initialising the wider model is the peak
    ((16, 20), (4, 4), 1, 32, (32, 40)),
    ((16, 16), (4, 4), 3, 64, (64, 64)),
])
def test_the_expansion_estimate_is_the_peak_of_the_tensors_at_image_shape_holds(shape, patch, depth, dim, target):
    torch.manual_seed(0)
    model = create_model(image_shape=shape, patch_shape=patch, depth=depth, dim=dim, num_classes=5)
    with LiveTensors(0) as tensors:  # the original's weights count once its state dict reads them
        wider = at_image_shape(model, target)
    assert wider.config.image_shape == target
    estimate = resources.expansion_memory(model.config, target)
    assert 1.0 <= estimate / tensors.peak <= 1.1, (estimate, tensors.peak)  # a bound, and a close one


def test_the_expansion_check_names_the_largest_shape_that_fits(monkeypatch):
    c = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=16, num_classes=6).config
    monkeypatch.setattr(resources, "available_memory", lambda device=None: (70 << 20, "RAM"))
    assert resources.check_expansion_memory(c, (8, 8)) == 0  # its own size: nothing is built
    with pytest.raises(MixerError, match=r"at most \[([0-9]+), \1\]") as caught:
        resources.check_expansion_memory(c, (800, 800))
    message = str(caught.value)
    assert message.startswith("image_shape [800, 800] expands the token mixing of weights for [8, 8] 10000-fold "
                              "(100x100): about ") and "of memory to build, but 70.0 MiB of RAM is available" in message
    side = int(message.rsplit("[", 1)[1].split(",")[0])
    resources.check_expansion_memory(c, (side, side))  # the suggestion fits
    with pytest.raises(MixerError):
        resources.check_expansion_memory(c, (side + 8, side + 8))
    monkeypatch.setattr(resources, "available_memory", lambda device=None: (1 << 20, "RAM"))
    with pytest.raises(MixerError, match=r"only the weights' own \[8, 8\] fits, without expansion"):
        resources.check_expansion_memory(c, (16, 16))


def limited_memory():  # in the child: an allocation the check missed fails at once instead of taking the machine
    resource.setrlimit(resource.RLIMIT_AS, (8 * GiB, 8 * GiB))


@pytest.mark.parametrize(("source", "shape"), [
    ("dir", [960, 960]),                 # a trained model directory (`mixer import-weights output x`)
    ("dir/model.safetensors", [1600, 800]),
    ("weights.safetensors", [960, 960]),  # bare weights
])
def test_import_weights_refuses_an_expansion_that_cannot_fit_before_building_it(tmp_path, source, shape):
    """Expanded 14,400- or 20,000-fold, the token-mixing weights of even this small model take hundreds of GiB."""
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=16, num_classes=6)
    save_model(model, tmp_path / "dir")
    (tmp_path / "weights.safetensors").write_bytes((tmp_path / "dir" / "model.safetensors").read_bytes())
    result = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "import-weights", source,
                             "out", "--image-shape", *map(str, shape)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=limited_memory, timeout=120)
    assert result.returncode == 2, result.stderr
    line = result.stderr
    assert line.startswith(f"error: {source}: image_shape {shape} expands the token mixing of weights for [8, 8] ")
    assert "of memory to build, but " in line and " is available; choose a smaller image_shape: " in line, line
    assert line.count("\n") == 1 and not (tmp_path / "out").exists()


def test_import_weights_expands_what_fits_and_refuses_what_does_not(model_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(resources, "available_memory", lambda device=None: (70 << 20, "RAM"))
    runner = CliRunner()
    result = runner.invoke(app, ["import-weights", str(model_dir), str(tmp_path / "big"), "--image-shape", "96", "96"])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "at most [" in result.output, \
        result.output
    assert not (tmp_path / "big").exists()
    fits = result.output.rsplit("at most ", 1)[1].strip()
    side = json.loads(fits)[0]
    result = runner.invoke(app, ["import-weights", str(model_dir), str(tmp_path / "ok"), "--image-shape",
                                 str(side), str(side)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["architecture"]["image_shape"] == [side, side]


# ---- predict: the options do what they say --------------------------------------------------------

def predict(args: list[str], model_dir, images):  # noqa: F811
    return CliRunner().invoke(app, ["predict", str(images), "--model", str(model_dir), *args])


@pytest.mark.parametrize("format", ["json", "csv"])
def test_format_without_out_streams_the_rows_to_stdout_and_nothing_else(model_dir, images, format):  # noqa: F811
    result = predict(["--format", format, "--top-k", "2"], model_dir, images)
    assert result.exit_code == 0, result.output
    text = result.stdout
    rows = pd.read_json(io.StringIO(text), lines=True, dtype=False) if format == "json" else \
        pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert list(rows.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert len(rows) == 4 and (rows["error"] != "").sum() == 1  # broken.png's row says why; no table, no summary


@pytest.mark.parametrize(("name", "format", "written"), [
    ("p.json", None, "json"),      # the name decides when --format is not given
    ("p.jsonl", None, "json"),
    ("p.ndjson", None, "json"),
    ("p.CSV", None, "csv"),
    ("p.txt", None, "csv"),        # a name that says nothing: CSV, as before
    ("p.txt", "json", "json"),
    ("p.jsonl", "json", "json"),
    ("p.csv", "csv", "csv"),
])
def test_the_out_file_holds_the_format_its_name_or_format_says(model_dir, images, tmp_path, name, format,
                                                               written):  # noqa: F811
    result = predict(["--out", str(tmp_path / name), *(["--format", format] if format else [])], model_dir, images)
    assert result.exit_code == 0, result.output
    text = (tmp_path / name).read_text()
    if written == "json":  # JSON Lines: an object per image
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == 4 and all({"path", "label_1", "prob_1", "error"} <= set(row) for row in rows), rows
    else:
        assert text.splitlines()[0].startswith('"path","label_1","prob_1"') and len(text.splitlines()) == 5


@pytest.mark.parametrize(("name", "format", "says"), [
    ("p.json", "csv", "--out {out} names a JSON file but --format is csv: name it {stem}.csv or leave --format out"),
    ("p.jsonl", "csv", "--out {out} names a JSON file but --format is csv: name it {stem}.csv"),
    ("p.csv", "json", "--out {out} names a CSV file but --format is json: name it {stem}.json or leave --format out"),
    ("p.csv", "xml", "--format must be one of csv, json, got 'xml'"),
])
def test_an_out_name_that_disagrees_with_format_is_one_line_before_any_work(model_dir, images, tmp_path, name, format,
                                                                            says):  # noqa: F811
    out = tmp_path / name
    result = predict(["--out", str(out), "--format", format], model_dir, images)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: " + says.format(out=out, stem=tmp_path / "p")), result.output
    assert result.output.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(("top_k", "labels", "note"), [
    (100, 6, "note: --top-k 100 is more than the model's 6 classes: each image gets all 6"),
    (7, 6, "note: --top-k 7 is more than the model's 6 classes: each image gets all 6"),
    (6, 6, None),
    (2, 2, None),
])
def test_top_k_above_the_class_count_is_said_and_gives_every_class(model_dir, images, tmp_path, top_k, labels,
                                                                   note):  # noqa: F811
    result = predict(["--top-k", str(top_k), "--out", str(tmp_path / "p.csv")], model_dir, images)
    assert result.exit_code == 0, result.output
    assert (note in result.stderr if note else "note:" not in result.stderr), result.stderr
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert [c for c in table.columns if c.startswith("label_")] == [f"label_{r}" for r in range(1, labels + 1)]


@pytest.mark.parametrize(("files", "workers", "cpus", "processes"), [
    (1, 64, 16, 1),    # one image: decoded here, no process forked
    (3, 64, 16, 3),    # never more processes than images
    (3, 64, 2, 2),     # nor than the CPUs this process may use
    (4, 2, 16, 2),     # what was asked, when there is work for it
    (4, 1, 16, 1),
])
def test_workers_are_never_more_than_the_images_or_the_cpus(model_dir, images, monkeypatch, files, workers, cpus,
                                                            processes):  # noqa: F811
    asked = []
    decode_many = mixer.inference.decode_many

    def counting(jobs, n, ordered=False):
        asked.append(n)
        return decode_many(jobs, 1, ordered=ordered)  # decoded here: the count is what is checked

    monkeypatch.setattr(mixer.inference, "decode_many", counting)
    monkeypatch.setattr(mixer.inference.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    found = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    paths = [str(p) for p in found[:files]] if files < len(found) else [str(images)]
    result = CliRunner().invoke(app, ["predict", *paths, "--model", str(model_dir), "--workers", str(workers)])
    assert result.exit_code == 0, result.output
    assert asked == [processes]


def test_a_reader_that_stops_early_ends_the_stream_quietly(tmp_path):
    """`mixer predict DIR --format json | head -1` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    from conftest import HANG, ROOT

    from mixer import create_model
    from mixer.checkpoint import save_model

    save_model(create_model(image_shape=(8, 8), patch_shape=(4, 4), depth=1, dim=8, num_classes=2), tmp_path / "m")
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(400):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(images / f"{i:03d}.png")
    mixer = str(Path(sys.executable).parent / "mixer")
    line = f"{mixer} predict {images} --model {tmp_path / 'm'} --format json --workers 1 | head -1"
    run = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=HANG,
                         cwd=tmp_path)
    assert run.stdout.startswith('{"path"') and run.stdout.count("\n") == 1
    assert run.returncode == 0 and "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr
