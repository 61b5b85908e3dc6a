"""predict and export: evaluation's preprocessing, a row per image (errors included), ONNX parity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mixer.checkpoint import load_model, save_model
from mixer.decoding import decode
from mixer.preprocess import to_float
from mixer.errors import MixerError
from mixer.inference import export_onnx, list_images, predict_files
from mixer.model import create_model
from pipeline.cli import app


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=16, num_classes=6)
    with torch.no_grad():
        model.head.weight.normal_()  # a trained-looking head, so predictions differ between images
    model.class_names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    save_model(model, tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "sub/b.jpg", "c.PNG"):
        Image.fromarray(rng.integers(0, 256, (20, 14, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_predict_matches_the_evaluation_path_and_keeps_going_past_a_bad_image(model_dir, images):
    model = load_model(model_dir)
    files, skipped = list_images([images])
    assert [f.name for f in files] == ["a.png", "broken.png", "c.PNG", "b.jpg"] and skipped == []
    table = predict_files(model, files, top_k=3)
    assert list(table["path"]) == [str(f) for f in files]
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert broken["error"] and broken["label_1"] == ""
    good = table[table["error"] == ""]
    assert len(good) == 3
    for row in good.itertuples():
        array, _ = decode(row.path, (8, 8))
        with torch.inference_mode():
            x = (to_float(torch.from_numpy(array[None].copy())) - 0.5) / 0.5  # the paper's normalisation
            expected = torch.softmax(model(x), 1)[0]
        top = expected.topk(3)
        assert [row.label_1, row.label_2, row.label_3] == [model.class_names[i] for i in top.indices]
        assert row.prob_1 == pytest.approx(top.values[0].item(), abs=1e-6)
        assert row.prob_1 >= row.prob_2 >= row.prob_3


def test_predict_cli_writes_the_csv(model_dir, images, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(images), "--model", str(model_dir), "--top-k", "2",
                                      "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert len(table) == 4 and (table["error"] != "").sum() == 1


@pytest.mark.parametrize("beside", ["its_config", "nothing", "another_format"])
def test_predict_with_a_weights_file_uses_the_config_beside_it_or_says_it_has_none(model_dir, images, tmp_path,
                                                                                    beside):
    """Class folders 1..12 made index labels look like real (wrong) class names; and the normalisation."""
    from mixer.preprocess import Preprocessing

    model = load_model(model_dir)
    model.preprocessing = Preprocessing(mean=(0.2, 0.3, 0.4), std=(0.1, 0.2, 0.3))  # not the default
    save_model(model, tmp_path / "custom")
    weights = tmp_path / "custom" / "model.safetensors"
    if beside != "its_config":
        (tmp_path / "bare").mkdir()
        weights = tmp_path / "bare" / "model.safetensors"
        weights.write_bytes((tmp_path / "custom" / "model.safetensors").read_bytes())
        if beside == "another_format":  # a timm-style config.json: not this project's
            (tmp_path / "bare" / "config.json").write_text('{"architecture": "mixer_b16_224", "num_classes": 6}')
    runner = CliRunner()
    tables = {}
    for (name, spec) in (("dir", tmp_path / "custom"), ("file", weights)):
        out = tmp_path / f"{name}.csv"
        result = runner.invoke(app, ["predict", str(images), "--model", str(spec), "--out", str(out)])
        assert result.exit_code == 0, result.output
        tables[name] = pd.read_csv(tmp_path / f"{name}.csv", keep_default_na=False, dtype={"label_1": str})
        note = "has no config.json of this project beside it: labels are class indices and the normalisation is " \
               "the default (mean 0.5, std 0.5)"
        assert (note in result.output) == (name == "file" and beside != "its_config"), result.output
    if beside == "its_config":
        pd.testing.assert_frame_equal(tables["file"], tables["dir"])
    else:
        assert set(tables["file"]["label_1"]) - {""} <= {str(i) for i in range(6)}
        assert not np.allclose(tables["file"]["prob_1"].replace("", np.nan).astype(float),
                               tables["dir"]["prob_1"].replace("", np.nan).astype(float), equal_nan=True)


@pytest.fixture
def many_images(tmp_path):
    """45 images with two unreadable files among them: more than the console lists."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(45):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    for i in (7, 30):
        (folder / f"{i:03d}.png").write_bytes(b"not a png")
    return folder


def test_predictions_stream_in_order_in_batches_whatever_the_workers(model_dir, many_images):
    from mixer.inference import predict_batches

    model = load_model(model_dir)
    files, _ = list_images([many_images])
    one = list(predict_batches(model, files, top_k=2, batch_size=8, workers=1))
    two = list(predict_batches(model, files, top_k=2, batch_size=8, workers=2))
    assert [len(c) for c in one] == [8, 8, 8, 8, 8, 5]  # a table per batch, not one at the end
    pd.testing.assert_frame_equal(pd.concat(one, ignore_index=True), pd.concat(two, ignore_index=True))
    table = pd.concat(two, ignore_index=True)
    assert list(table["path"]) == [str(f) for f in files]
    assert list(table.index[table["error"] != ""]) == [7, 30]


def test_many_predictions_are_summed_up_and_written_as_csv_or_json_lines(model_dir, many_images, tmp_path):
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["predict", str(many_images), "--model", str(model_dir), "--workers", "2",
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert "45 images in" in result.output and "43 predicted, 2 could not be read" in result.output
    assert "007.png" in result.output and "012.png" not in result.output  # errors listed, not every row
    csv = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    most = csv["label_1"][csv["label_1"] != ""].value_counts()
    assert f"most predicted: {most.index[0]} {most.iloc[0]}" in result.output
    result = runner.invoke(app, ["predict", str(many_images), "--model", str(model_dir), "--format", "json",
                                 "--out", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    lines = pd.read_json(tmp_path / "p.jsonl", lines=True, dtype=False)
    assert len(lines) == 45 and list(lines["path"]) == list(csv["path"])
    assert list(lines["label_1"]) == list(csv["label_1"])
    assert runner.invoke(app, ["predict", str(many_images), "--model", str(model_dir), "--format", "xml"]).exit_code == 2


def test_predict_errors(model_dir, tmp_path):
    with pytest.raises(MixerError, match="does not exist"):
        list_images([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixerError, match="no images found"):
        list_images([tmp_path / "empty"])
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope.png"), "--model", str(model_dir)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_predict_survives_hostile_file_names_and_special_files(model_dir, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = ["[bold red]x.png", "a[/b]c.png", "$x$.png", "new\nline.png"]  # a[ is a folder: the path holds [/b]
    (folder / "a[").mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(folder / name)
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "loop").symlink_to(".")
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(app, ["predict", str(folder), str(folder / "pipe.png"),
                                                             "--model", str(model_dir), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    for name in ("[bold red]x.png", "a[/b]c.png"):  # shown as written, not taken as markup
        assert name in result.output.replace("\n", "")
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    errors = dict(zip(table["path"].map(lambda p: p.removeprefix(str(folder) + "/")), table["error"]))
    assert errors["pipe.png"] == "not a regular file (FIFO)" and errors["zero.png"].startswith("not a regular file")
    assert errors["loop"].startswith("link to a folder already scanned")
    assert all(errors[n] == "" for n in names)


@pytest.mark.parametrize("out", ["dir", "under_a_file"])
def test_predict_out_that_cannot_be_written_is_one_line(model_dir, images, tmp_path, out):
    target = tmp_path if out == "dir" else tmp_path / "file.txt" / "p.csv"
    (tmp_path / "file.txt").write_text("x")
    result = CliRunner().invoke(app, ["predict", str(images), "--model", str(model_dir), "--out", str(target)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_onnx_export_parity_and_dynamic_batch(model_dir):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = load_model(model_dir)
    difference = export_onnx(model, model_dir / "model.onnx")
    assert difference <= 1e-4
    session = onnxruntime.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.randn(batch, 3, 8, 8)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 6) and np.abs(got - expected).max() <= 1e-4


def test_the_predict_table_keeps_each_path_on_one_line_at_the_default_top_k(model_dir, images, monkeypatch):
    """At 80 columns the eleven columns of top-5 wrapped every path over three lines."""
    monkeypatch.chdir(images.parent)
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["predict", images.name, "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for path in [str(f) for f in list_images([Path(images.name)])[0]]:
        assert any(path in line for line in lines), (path, result.output)
    row = next(line for line in lines if "a.png" in line)
    assert sum(name in row for name in ("ant", "bee", "cat", "dog", "eel", "fox")) >= 3  # the top-5 beside it
    assert "broken.png" in result.output and "error" in result.output


def test_a_path_longer_than_half_the_terminal_shows_its_end(model_dir, images):
    deep = images / ("d" * 70)
    deep.mkdir()
    (images / "a.png").rename(deep / "a.png")
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, ["predict", str(deep / "a.png"), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert any(line.count("…" + "d" * 20) == 1 and "/a.png" in line for line in result.output.splitlines()), result.output
