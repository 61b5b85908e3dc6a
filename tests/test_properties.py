"""The rule, for any input: exit 0 with consistent outputs, or exit 2 with one line and nothing changed.

`hypothesis` writes params files (wrong types, out-of-range values, YAML oddities, other encodings)
and data folders (odd names, links and loops, FIFOs, corrupt and empty files); the commands run on
them as a user would run them. No traceback, no hang (each example is bounded by pytest-timeout).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from conftest import HANG, ROOT
from mixer.data import open_prepared
from pipeline.cli import app
from pipeline.params import Params, load_params

COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())
runner = CliRunner()


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def one_line_error(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


# ---- params files ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**25, 10**25), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e-3", "", "digits", "cosine", "sgd", "stretch", "S/16", "0x10", "yes", "~"]),
    st.text(max_size=8))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=3), scalars, max_size=2))


@st.composite
def params_files(draw) -> bytes:
    params = dict(COMMITTED)
    for key in draw(st.lists(st.sampled_from(sorted(params)), max_size=4, unique=True)):
        params[key] = draw(values)
    for key in draw(st.lists(st.sampled_from(sorted(params)), max_size=1)):
        del params[key]
    if draw(st.booleans()):
        params[draw(st.sampled_from(["dept", "learning_rate", "Depth"]))] = 1
    text = yaml.safe_dump(params, sort_keys=draw(st.booleans()), allow_unicode=True)
    oddity = draw(st.sampled_from(["none", "duplicate", "truncate", "tab", "bom", "utf16", "garbage"]))
    if oddity == "duplicate":
        text += f"{draw(st.sampled_from(sorted(COMMITTED)))}: 1\n"
    elif oddity == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif oddity == "tab":
        text = text.replace("\n", "\n\t", 1)
    elif oddity == "garbage":
        text = text + draw(st.sampled_from(["[", "{a: ", "- -", "&a *b", "? [x]\n: 1\n", "!!python/object:os.system x\n"]))
    data = text.encode("utf-16" if oddity == "utf16" else "utf-8")
    return b"\xef\xbb\xbf" + data if oddity == "bom" else data


# Values each key surely accepts: a params file of the committed one with some of them in must pass, so
# the property below cannot hold for a check that refuses everything.
VALID = {
    "seed": st.integers(0, 2**31 - 1), "depth": st.integers(1, 12), "batch_size": st.integers(1, 1024),
    "num_steps": st.integers(3, 1000), "lr": st.sampled_from([1.0e-4, 3.0e-3, 0.1]), "dropout": st.floats(0, 0.5),
    "drop_path": st.floats(0, 0.5), "hflip": st.floats(0, 1), "label_smoothing": st.floats(0, 0.3),
    "scheduler": st.sampled_from(["cosine", "linear"]), "optimizer": st.sampled_from(["sgd", "adamw"]),
    "resize": st.sampled_from(["stretch", "center_crop"]), "strict": st.booleans(), "drop_duplicates": st.booleans(),
    "output_dir": st.sampled_from(["output", "models/run 1"]),
}


@st.composite
def valid_params_files(draw) -> bytes:
    params = dict(COMMITTED)
    for key in draw(st.lists(st.sampled_from(sorted(VALID)), max_size=4, unique=True)):
        params[key] = draw(VALID[key])
    return yaml.safe_dump(params, sort_keys=draw(st.booleans()), allow_unicode=True).encode()


@settings(max_examples=180, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # about half valid files
@given(case=st.one_of(params_files().map(lambda content: (content, False)),
                      valid_params_files().map(lambda content: (content, True))))
@example(case=(yaml.safe_dump(COMMITTED, sort_keys=False).encode(), True))  # the committed params, always tried
@pytest.mark.timeout(HANG, method="thread")  # a hang ends the run: hypothesis would catch and shrink the signal method's error
def test_any_params_file_is_valid_or_one_line(case):
    content, valid = case
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        Path("params.yaml").write_bytes(content)
        result = runner.invoke(app, ["check"])
        event(f"exit {result.exit_code}" + (" (a valid file)" if valid else ""))
        if valid:  # a file of valid values is accepted: "one line" is not an answer to it
            assert result.exit_code == 0, (result.output, content.decode())
        if result.exit_code == 0:
            p = load_params(Path("params.yaml"))  # consistent: the file the check passed loads to valid Params
            assert isinstance(p, Params) and Path("reports/params-check.txt").is_file()
        else:
            one_line_error(result)
            assert not Path("reports").exists()


# ---- data folders ------------------------------------------------------------------------------------

NAMES = st.one_of(st.sampled_from(["cat", "dog", "ünï 猫", "[b]x[/b]", "$x$", "a b", "-dash", "p$\\frac$",
                                   "new\nline", ".hidden", "x" * 60]),
                  st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"), min_size=1,
                          max_size=8))


@st.composite
def data_folders(draw):
    """A recipe for a data folder: class folders of files, links and special entries."""
    classes = draw(st.lists(NAMES, min_size=1, max_size=4, unique_by=lambda n: n.lower()))
    entries = []
    for name in classes:
        for _ in range(draw(st.integers(0, 5))):
            kind = draw(st.sampled_from(["png", "png", "png", "jpg", "corrupt", "empty", "fifo", "loop", "up",
                                         "devzero", "broken", "latin1", "nested", "text"]))
            entries.append((name, kind, draw(NAMES), draw(st.integers(0, 2**16))))
    return classes, entries


def build(root: Path, recipe) -> None:
    classes, entries = recipe
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
    for (i, (cls, kind, name, seed)) in enumerate(entries):
        folder = root / cls
        stem = f"{i}-{name}"
        pixels = np.random.default_rng(seed).integers(0, 256, (6 + seed % 7, 5 + seed % 5, 3), dtype=np.uint8)
        try:
            if kind == "png":
                Image.fromarray(pixels).save(folder / f"{stem}.png")
            elif kind == "jpg":
                Image.fromarray(pixels).save(folder / f"{stem}.JPG", format="JPEG")
            elif kind == "nested":
                (folder / stem).mkdir(exist_ok=True)
                Image.fromarray(pixels).save(folder / stem / "deep.png")
            elif kind == "corrupt":
                (folder / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + pixels.tobytes()[:20])
            elif kind == "empty":
                (folder / f"{stem}.jpg").write_bytes(b"")
            elif kind == "text":
                (folder / f"{stem}.txt").write_text("notes")
            elif kind == "fifo":
                os.mkfifo(folder / f"{stem}.png")
            elif kind == "loop":
                (folder / stem).symlink_to(".")
            elif kind == "up":
                (folder / stem).symlink_to("..")
            elif kind == "devzero":
                (folder / f"{stem}.png").symlink_to("/dev/zero")
            elif kind == "broken":
                (folder / f"{stem}.png").symlink_to(folder / "nowhere")
            elif kind == "latin1":
                Image.fromarray(pixels).save(os.fsencode(folder) + f"/{i}-caf".encode() + b"\xe9.png")
        except (OSError, ValueError):  # a name the file system refuses (too long, say): not this test's subject
            pass


def consistent(project: Path) -> None:
    """What a successful prepare leaves must agree with itself and with the data report."""
    prepared = open_prepared(project / "prepared")
    report = json.loads((project / "reports" / "data.json").read_text(encoding="utf-8"))
    assert report["classes"] == prepared.classes
    counts = {s: sum(c.values()) for (s, c) in report["counts"].items()}
    assert counts == {s: int((prepared.table["split"] == s).sum()) for s in ("train", "val", "test")}
    assert all(isinstance(p, str) for p in prepared.table["path"])


@st.composite
def valid_data_folders(draw):
    """A recipe that surely prepares: 2 to 4 classes of 3 to 6 distinct, decodable images each."""
    classes = draw(st.lists(st.sampled_from(["cat", "dog", "ünï 猫", "a b", "fox"]), min_size=2, max_size=4,
                            unique=True))
    base = draw(st.integers(0, 2**16))
    entries = [(name, draw(st.sampled_from(["png", "jpg"])), draw(st.sampled_from(["img", "photo 1", "ünï"])), base)
               for name in classes for _ in range(draw(st.integers(3, 6)))]
    return classes, [(cls, kind, name, seed + i) for (i, (cls, kind, name, seed)) in enumerate(entries)]


@settings(max_examples=90, deadline=None,  # about half valid folders
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=st.one_of(data_folders().map(lambda recipe: (recipe, False)),
                      valid_data_folders().map(lambda recipe: (recipe, True))))
@example(case=((["cat", "dog"], [(c, "png", "img", 7 * i + j) for (i, c) in enumerate(["cat", "dog"])
                                 for j in range(4)]), True))  # always tried: a plain folder prepares
@pytest.mark.timeout(HANG, method="thread")
def test_any_data_folder_prepares_consistently_or_is_one_line(case):
    recipe, valid = case
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as mp:
        project = Path(folder)
        mp.chdir(project)
        base = dict(COMMITTED, image_shape=[8, 8], patch_shape=[2, 2], num_classes=None, strict=False,
                    val_fraction=0.25)  # every split gets an image from classes of 3 or more
        (project / "params.yaml").write_text(yaml.safe_dump(dict(base, dataset="good")))
        for (name, n) in (("a", 6), ("b", 6)):  # a prepared cache and report the user already has
            (project / "good" / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 0, 255 if name == "a" else 0)).save(project / "good" / name / f"{i}.png")
        assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
        before = snapshot(project / "prepared"), snapshot(project / "reports")
        build(project / "data", recipe)
        (project / "params.yaml").write_text(yaml.safe_dump(dict(base, dataset="data")))
        result = runner.invoke(app, ["prepare", "--workers", "1"])
        event(f"exit {result.exit_code}" + (" (a valid folder)" if valid else ""))
        if valid:  # a folder of good images prepares, into a cache of its own classes
            assert result.exit_code == 0, result.output
            assert open_prepared(project / "prepared").classes == sorted(recipe[0])
        if result.exit_code == 0:
            consistent(project)
        else:
            one_line_error(result)
            assert (snapshot(project / "prepared"), snapshot(project / "reports")) == before
        assert not [p for p in project.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]
