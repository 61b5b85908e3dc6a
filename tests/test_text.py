"""Strings from outside reach the terminal and the reports inert: escaped on the console, escaped in
Markdown, and neutralised for spreadsheets in CSV (mixer/text.py is the one home of the rule)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import HANG, ROOT, make_image_folder, write_params
from mixer.checkpoint import save_model
from mixer.data import write_csv
from mixer.model import create_model
from mixer.sources import printable
from mixer.text import BIDI, SEPARATORS, markdown, param_text, shown, spreadsheet_safe
from pipeline.cli import app

OSC52 = "\x1b]52;c;SGVsbG8=\x07"  # writes "Hello" to the clipboard of a terminal that allows it
CLEAR = "\x1b[2J"                  # clears the screen
HOSTILE = ["a" + OSC52 + ".png", "b" + CLEAR + ".png", "c\u202egnp.exe.png", "d\x9b31m.png", "e\u2066f\u2069.png"]
CLASSES = [OSC52, CLEAR, "\u202eevil"]


def raw_controls(text: str) -> list[str]:
    """The characters in `text` that a terminal acts on or that reorder a line (a line break aside)."""
    return [c for c in text if c != "\n" and (unicodedata.category(c) == "Cc" or ord(c) in BIDI | SEPARATORS)]


def image(path: Path, seed: int = 0) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(path, "PNG")
    return path


def model_dir(folder: Path, classes: list[str]) -> Path:
    torch.manual_seed(0)
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=16, num_classes=len(classes))
    model.class_names = list(classes)
    save_model(model, folder)
    return folder


# ---- the functions ---------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (OSC52, "\\x1b]52;c;SGVsbG8=\\x07"),
    (CLEAR, "\\x1b[2J"),
    ("a\nb\rc\td", "a\\nb\\rc\\td"),              # one line stays one line
    ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),  # NUL, DEL, C1 (NEL, CSI)
    ("abc\u202edef\u2066\u2069\u200f", "abc\\u202edef\\u2066\\u2069\\u200f"),
    ("line\u2028sep", "line\\u2028sep"),
    (os.fsdecode(b"caf\xe9.png"), "caf\\xe9.png"),  # a name that is not UTF-8, as printable() shows it
    (b"caf\xe9\x1b", "caf\\xe9\\x1b"),
    (Path("dir\x1b/x.png"), "dir\\x1b/x.png"),
    ("\ud800", "\\ud800"),                          # a lone surrogate (JSON allows one) cannot be printed
])
def test_shown_escapes_what_drives_a_terminal(value, expected):
    assert shown(value) == expected
    assert shown(["café 猫 [b]x[/b] $x$", 3]) == "['café 猫 [b]x[/b] $x$', 3]"  # ordinary text stays as it is


def test_printable_keeps_its_contract_and_shares_the_implementation():
    """printable() is for data (CSV, JSON, the manifest): undecodable bytes escaped, the name kept."""
    assert printable(os.fsdecode(b"cat/caf\xe9.png")) == "cat/caf\\xe9.png"
    assert printable("a\rb\x1b.png") == "a\rb\x1b.png"  # the real name, read back from the manifest
    assert shown(printable(os.fsdecode(b"caf\xe9\x1b"))) == "caf\\xe9\\x1b"


def unshown(text: str) -> str:
    names = {"n": "\n", "r": "\r", "t": "\t"}
    return re.sub(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|([nrt]))",
                  lambda m: names[m[3]] if m[3] else chr(int(m[1] or m[2], 16)), text)


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and controls too


@settings(max_examples=300, deadline=None)
@given(ANY_TEXT)
def test_shown_leaves_no_control_or_bidi_character_and_is_idempotent(text):
    out = shown(text)
    assert raw_controls(out) == [] and "\n" not in out
    assert not any(unicodedata.category(c) == "Cs" for c in out)  # printable on any stream
    assert shown(out) == out  # a message built from shown() parts can go through fail() again


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(exclude_characters="\\"), max_size=40),
       st.sampled_from(["\x1b", "\x07", "\n", "\r", "\x00", "\x9b", "\u202e", "\u2066"]), st.integers(0, 40))
def test_shown_round_trips_so_a_control_character_never_disappears(text, control, at):
    assert unshown(shown(text)) == text  # text without a backslash (or surrogate) comes back as it was
    other = text[:at] + control + text[at:]
    assert shown(other) != shown(text) and unshown(shown(other)) == other
    assert control not in shown(other)  # and it shows as an escape, not as itself


def test_markdown_renders_as_the_text_it_is():
    value = "<img src=x onerror=alert(1)>|[click](http://x) `code` *b* _i_ & \\ " + OSC52
    out = markdown(value)
    assert "<" not in out and ">" not in out and "\x1b" not in out and "\x07" not in out
    assert not re.search(r"(?<!\\)[|`\[\]*_]", out.replace("\\\\", ""))  # every one escaped
    assert "&lt;img" in out and "\\\\x1b" in out  # the escape itself shows: \x1b


CELLS = [  # (cell, as a spreadsheet gets it)
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
    ("+1", "'+1"), ("-2+3", "'-2+3"), ("@SUM(A1:A2)", "'@SUM(A1:A2)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("-1", "'-1"),  # a class so named: quoted too, documented in spreadsheet_safe
    ("cat", "cat"), ("a=b", "a=b"), ("", ""), (-1.5, -1.5), (3, 3),
]


def test_spreadsheet_safe_neutralises_formulas_only():
    assert [spreadsheet_safe(cell) for (cell, _) in CELLS] == [expected for (_, expected) in CELLS]


def test_write_csv_neutralises_formulas_for_spreadsheets_but_not_in_the_manifest():
    table = pd.DataFrame({"label": pd.Series([c for (c, _) in CELLS], dtype=object), "prob": -0.5})
    buffer = io.StringIO()
    write_csv(table, buffer)
    rows = list(csv.reader(io.StringIO(buffer.getvalue()), quoting=csv.QUOTE_NONNUMERIC))[1:]
    assert rows == [[expected, -0.5] for (_, expected) in CELLS]  # numbers stay numbers
    assert list(table["label"]) == [c for (c, _) in CELLS]  # the caller's table is left alone
    raw = io.StringIO()  # the manifest, which the package reads back, keeps names as they are
    write_csv(table, raw, spreadsheet=False)
    assert [r[0] for r in list(csv.reader(io.StringIO(raw.getvalue()), quoting=csv.QUOTE_NONNUMERIC))[1:]] == \
        [c for (c, _) in CELLS]


# ---- the surfaces ----------------------------------------------------------------------------

def predict_file_names(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    for (i, name) in enumerate(HOSTILE):
        image(folder / name, i)
    return ["predict", str(folder), "--model", str(model_dir(tmp_path / "m", ["ant", "bee"])), "--top-k", "1"], 0


def predict_class_names(tmp_path):
    """A downloaded model directory: its config.json names the classes."""
    directory = model_dir(tmp_path / "m", CLASSES)
    assert json.loads((directory / "config.json").read_text())["class_names"] == CLASSES  # raw in JSON
    return ["predict", str(image(tmp_path / "x.png")), "--model", str(directory), "--top-k", "3"], 0


def predict_summary(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(21):
        image(folder / f"img{i:02d}.png", i)
    for name in HOSTILE[:3]:
        (folder / ("0" + name)).write_bytes(b"not a png")  # sorted first: the summary lists 3 errors
    return ["predict", str(folder), "--model", str(model_dir(tmp_path / "m", CLASSES))], 0


def predict_out(tmp_path):
    return ["predict", str(image(tmp_path / "x.png")), "--model", str(model_dir(tmp_path / "m", ["a", "b"])),
            "--out", str(tmp_path / ("p" + CLEAR + ".csv"))], 0


def error_missing_path(tmp_path):
    return ["predict", str(tmp_path / ("no" + OSC52 + "\n\u202e.png")),
            "--model", str(model_dir(tmp_path / "m", ["a", "b"]))], 2


def error_bad_model(tmp_path):
    (tmp_path / ("model" + CLEAR)).mkdir()
    return ["predict", str(image(tmp_path / "x.png")), "--model", str(tmp_path / ("model" + CLEAR))], 2


def import_weights(tmp_path):
    weights = model_dir(tmp_path / "m", ["a", "b"]) / "model.safetensors"
    return ["import-weights", str(weights), str(tmp_path / ("out" + OSC52))], 0


def check(tmp_path):
    data = tmp_path / ("data" + OSC52 + "\u202e")
    make_image_folder(data, {"a": 10, "b": 10}, size=(4, 4))  # a valid folder: check lists it and prints its name
    write_params(tmp_path / "params.yaml", data=str(data), num_classes=None)
    return ["check"], 0


@pytest.mark.parametrize("surface", [predict_file_names, predict_class_names, predict_summary, predict_out,
                                     error_missing_path, error_bad_model, import_weights, check])
def test_no_raw_control_character_reaches_the_console(surface, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (args, code) = surface(tmp_path)
    result = CliRunner(env={"COLUMNS": "400", "NO_COLOR": "1"}).invoke(app, args)
    assert result.exit_code == code, result.output
    for text in (result.stdout, result.stderr):
        assert raw_controls(text) == [], text
    assert "\\x1b" in result.output or "\\u202e" in result.output  # shown, escaped, not dropped
    if code == 2:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")  # one line


def test_predict_summary_names_the_classes_and_files_escaped(tmp_path):
    (args, _) = predict_summary(tmp_path)
    output = CliRunner(env={"COLUMNS": "400"}).invoke(app, args).output
    assert "most predicted: " in output and "24 images in" in output
    assert f"0a{shown(OSC52)}.png: not an image" in output


def test_a_downloaded_models_class_names_cannot_drive_the_terminal(tmp_path):
    """The real command in a child process, bytes as a terminal would get them."""
    args, _ = predict_class_names(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True,
                            env={**os.environ, "COLUMNS": "400"}, timeout=HANG)
    assert result.returncode == 0, result.stderr
    for stream in (result.stdout, result.stderr):
        assert not {0x1b, 0x07} & set(stream), stream  # no ESC, no BEL
        text = stream.decode("utf-8")
        assert "\x9b" not in text and raw_controls(text) == []
    assert shown(OSC52) in result.stdout.decode() and shown(CLEAR) in result.stdout.decode()


def test_train_notes_are_escaped(capsys):
    from pipeline.progress import ConsoleReporter

    ConsoleReporter(bar=False).note(f"checkpoint {OSC52} (params say {CLEAR})")
    out = capsys.readouterr().out
    assert raw_controls(out) == [] and out == f"note: checkpoint {shown(OSC52)} (params say {shown(CLEAR)})\n"


def test_the_run_report_escapes_params_values():
    from pipeline.evaluate import readme
    from pipeline.params import Params

    data = "data/<img src=x onerror=alert(1)>|[x](http://evil)`" + OSC52
    metrics = {"accuracy": 0.5, "top5_accuracy": 1.0, "loss": 1.0, "test_images": 3,
               "val": {"accuracy": 0.5, "top5_accuracy": 1.0, "loss": 1.0},
               "data": {"prepared": "0" * 64, "matches_model": True}}
    text = readme(Params(dataset=data), metrics)
    assert raw_controls(text) == [] and "<img" not in text and not re.search(r"(?<!\\)\]\(http://evil", text)
    row = next(line for line in text.splitlines() if line.startswith("| `dataset` |"))
    assert len(re.findall(r"(?<!\\)\|", row.replace("\\\\", ""))) == 3  # the value stays in its cell
    assert row == f"| `dataset` | {markdown(data)} |"


def test_predictions_csv_is_safe_to_open_in_a_spreadsheet(tmp_path):
    classes = ['=HYPERLINK("http://evil","x")', "+1", "-2+3", "@SUM(A1)"]
    args = ["predict", str(image(tmp_path / "x.png")), "--model", str(model_dir(tmp_path / "m", classes)),
            "--top-k", "4", "--out", str(tmp_path / "p.csv")]
    assert CliRunner().invoke(app, args).exit_code == 0
    row = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).iloc[0]
    labels = [row[f"label_{r}"] for r in range(1, 5)]
    assert sorted(labels) == sorted("'" + c for c in classes)
    assert all(isinstance(row[f"prob_{r}"], float) for r in range(1, 5))  # numbers stay numbers


@pytest.mark.parametrize(("value", "yaml", "option"), [
    (None, "null", "null"), (True, "true", "true"), (False, "false", "false"), (1e-3, "0.001", "0.001"),
    ((256, 256), "[256, 256]", "256 256"), ("hf-hub:timm/x", "hf-hub:timm/x", "hf-hub:timm/x"), (6, "6", "6"),
])
def test_a_params_value_reads_as_yaml_in_reports_and_as_its_option_in_help(value, yaml, option):
    assert param_text(value) == yaml and param_text(value, command_line=True) == option
