"""A data folder is read one unambiguous way, and every class can be learned: split folders in any case
or beside other folders, splits that end up empty, classes without a training image, class names that
print alike. Each refusal is one MixerError naming the culprit, raised as early as it can be known
(listing, `check_source` or after decoding), so `mixer check` stops whatever it can."""

from __future__ import annotations

import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import write_params
from mixer.data import PrepareConfig, check_source, prepare
from mixer.errors import MixerError
from mixer.sources import scan_folder
from pipeline.cli import app

NFC, NFD = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")


def build(root: Path, spec: dict[str, int]) -> Path:
    """`spec`: folder (relative, 'train/cat') -> how many distinct 4×4 PNGs it holds; 0 makes it empty."""
    for (i, (rel, n)) in enumerate(spec.items()):
        (root / rel).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            pixels = np.random.default_rng([i, j]).integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / rel / f"{j}.png")
    return root


def copy(src: str, dst: str):
    def extra(root: Path) -> None:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / src, root / dst)
    return extra


def write(rel: str, content: bytes = b"not an image"):
    def extra(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return extra


def link_out(rel: str):
    def extra(root: Path) -> None:
        outside = build(root.parent / "outside", {"x": 1})
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(outside / "x" / "0.png")
    return extra


SPLIT = {"train/a": 6, "train/b": 6, "val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2}

# (id, folders, extra files, params, where it is refused, the message; {root} is the data folder)
REFUSED = [
    ("extra_folder", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2, "extra": 1}, None, {}, "scan",
     "data folder {root} has split folders (test/, train/) beside other folders (extra/), so it reads neither as "
     "one folder per class nor as split folders: move extra/ out of it, or into the split folders if it is a class"),
    ("extra_folder_beside_capitalised", {"Train/a": 6, "Train/b": 6, "Val/a": 1, "Val/b": 1, "dog": 3}, None, {},
     "scan", "data folder {root} has split folders (Train/, Val/) beside other folders (dog/)"),
    ("no_train", {"val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2}, None, {}, "scan",
     "data folder {root} has test/, val/ but no train/: a split data folder needs train/<class>/ to learn from; "
     "add it, or rename the folders if they are classes"),
    ("no_train_capitalised", {"Val/a": 2, "Val/b": 2, "Test/a": 2, "Test/b": 2}, None, {}, "scan",
     "data folder {root} has Test/, Val/ but no train/"),
    ("train_and_Train", {"train/a": 6, "train/b": 6, "Train/a": 6, "Train/b": 6}, None, {}, "scan",
     "data folder {root} has Train/ and train/: one folder per split"),
    ("val_and_valid", {**SPLIT, "valid/a": 2, "valid/b": 2}, None, {}, "scan",
     "data folder {root} has val/ and valid/: one folder per split"),
    ("case_alike_classes", {"Cat": 6, "cat": 6}, None, {}, "scan",
     "class folders {root}/Cat and {root}/cat differ only by letter case or Unicode form or invisible characters, "
     "so they would be two classes that print alike: merge them into one folder, or rename one"),
    ("nfc_and_nfd_classes", {NFC: 6, NFD: 6}, None, {}, "scan",
     f"class folders {{root}}/{NFD} and {{root}}/{NFC} differ only by letter case or Unicode form or invisible "
     "characters"),
    ("case_alike_across_splits", {"train/Cat": 6, "train/dog": 6, "val/cat": 2, "val/dog": 2}, None, {}, "scan",
     "class folders {root}/train/Cat and {root}/val/cat differ only by letter case"),
    ("class_missing_from_train", {**SPLIT, "val/c": 2}, None, {}, "check",
     "data {root}: class 'c' has images in val/ but none in train/, so it cannot be learned; add images to "
     "train/c/ or remove val/c/"),
    ("class_missing_from_Train", {"Train/a": 6, "Train/b": 6, "Test/a": 2, "Test/b": 2, "Test/c": 2}, None, {},
     "check", "data {root}: class 'c' has images in Test/ but none in Train/"),
    ("empty_val_folder", {"train/a": 6, "train/b": 6, "val": 0, "test/a": 2, "test/b": 2}, None, {}, "check",
     "data {root}: val/ holds no images; put images in val/<class>/, or remove val/ to cut val from train/ by "
     "val_fraction"),
    ("val_of_other_files", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2}, write("val/a/notes.txt"), {},
     "check", "data {root}: val/ holds no images"),
    ("val_linked_out", {"train/a": 6, "train/b": 6, "Test/a": 2, "Test/b": 2}, link_out("Valid/a/x.png"), {},
     "check", "data {root}: Valid/ holds no images; put images in Valid/<class>/, or remove Valid/"),
    ("cut_val_too_small", {"a": 4, "b": 4}, None, {}, "check",
     "data {root}: val_fraction 0.1 leaves the val split empty (a class of n images gives about n × 0.1, and the "
     "largest has 4); raise val_fraction, or add images"),
    ("cut_test_too_small", {"a": 2, "b": 2}, None, {"val_fraction": 0.5, "test_fraction": 0.2}, "check",
     "data {root}: test_fraction 0.2 leaves the test split empty"),
    ("cut_val_from_train_too_small", {"train/a": 2, "train/b": 2, "test/a": 1, "test/b": 1}, None, {}, "check",
     "data {root}: val_fraction 0.1 leaves the val split empty (a class of n images gives about n × 0.1, and the "
     "largest has 2)"),
    ("val_all_duplicates_of_train", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2},
     lambda root: (copy("train/a/0.png", "val/a/0.png")(root), copy("train/b/0.png", "val/b/0.png")(root)), {},
     "prepare", "data {root}: the val split holds no image once its 2 duplicate(s) of images in an earlier split "
     "are dropped; add other images, or set drop_duplicates: false"),
    ("train_class_undecodable", {"train/a": 6, "val/a": 1, "val/b": 1, "test/a": 1, "test/b": 1},
     write("train/b/bad.png"), {}, "prepare",
     "data {root}: class 'b' has usable images in val/ but none in train/, so it cannot be learned"),
    ("same_image_in_two_classes_strict", {"a": 6, "b": 6}, copy("a/0.png", "b/copy.png"), {"strict": True},
     "prepare", "{root}: 'a/0.png' and 'b/copy.png' hold the same image, labelled 'a' and 'b' (strict: true; 1 such "
     "image(s)); keep only the copy in the right class"),
]

# (id, folders, extra files, params, the classes and given splits it reads as)
READ = [
    ("capitalised_splits", {"Train/cat": 6, "Train/dog": 6, "Test/cat": 2, "Test/dog": 2}, None, {},
     (["cat", "dog"], ("test", "train"))),
    ("upper_case_splits", {"TRAIN/cat": 6, "TRAIN/dog": 6, "VAL/cat": 2, "VAL/dog": 2, "TEST/cat": 2, "TEST/dog": 2},
     None, {}, (["cat", "dog"], ("test", "train", "val"))),
    ("validation_and_hidden_git_and_a_file", {"train/a": 6, "train/b": 6, "Validation/a": 1, "Validation/b": 1},
     lambda root: (build(root, {".git/objects": 1}), write("README.md", b"# photos\n")(root)), {},
     (["a", "b"], ("train", "val"))),
    ("class_names_near_split_names", {"trainee": 6, "tests": 6}, None, {}, (["tests", "trainee"], ())),
    ("duplicates_kept", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2},
     lambda root: (copy("train/a/0.png", "val/a/0.png")(root), copy("train/b/0.png", "val/b/0.png")(root)),
     {"drop_duplicates": False}, (["a", "b"], ("test", "train", "val"))),
]


def read(root: Path, out: Path, **params) -> tuple[str, object]:
    """Scan, check, prepare: the stage that refused (and the error), or 'ok' and (source, report)."""
    config = PrepareConfig(image_shape=(4, 4), **params)
    stage = "scan"
    try:
        source = scan_folder(root)
        stage = "check"
        check_source(source, config)
        stage = "prepare"
        report = prepare(source, out, config)
    except MixerError as exc:
        return stage, str(exc)
    return "ok", (source, report)


def make(tmp_path: Path, spec: dict, extra) -> Path:
    root = build(tmp_path / "photos", spec)
    if extra is not None:
        extra(root)
    return root


@pytest.mark.parametrize(("spec", "extra", "params", "stage", "message"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_a_layout_that_cannot_be_read_one_way_or_learned_is_refused(tmp_path, spec, extra, params, stage, message):
    root = make(tmp_path, spec, extra)
    (where, result) = read(root, tmp_path / "cache", **params)
    assert (where, message.format(root=root) in str(result)) == (stage, True), result


@pytest.mark.parametrize(("spec", "extra", "params", "expected"), [c[1:] for c in READ], ids=[c[0] for c in READ])
def test_a_layout_that_reads_one_way_is_read_so(tmp_path, spec, extra, params, expected):
    root = make(tmp_path, spec, extra)
    (where, result) = read(root, tmp_path / "cache", **params)
    assert where == "ok", result
    (source, report) = result
    assert (source.classes, source.given_splits) == expected
    assert all(sum(report["counts"][s].values()) > 0 for s in ("train", "val", "test"))


def test_the_same_image_in_two_classes_is_reported(tmp_path):
    """Not strict: kept under both labels, and listed with the CSV's label conflicts (one count in the report)."""
    root = make(tmp_path, {"a": 6, "b": 6}, copy("a/0.png", "b/copy.png"))
    (where, (_, report)) = read(root, tmp_path / "cache")
    assert where == "ok"
    assert report["label_conflicts"] == [{"path": "a/0.png", "labels": ["a", "b"], "copies": ["a/0.png", "b/copy.png"],
                                          "copy_labels": ["a", "b"]}]


@pytest.mark.parametrize("data", ["/", "~"])
def test_the_file_system_root_or_home_is_never_walked(tmp_path, monkeypatch, data):
    """`dataset: /` listed every file on the machine as some class's image, for minutes."""
    home = build(tmp_path / "home", {"a": 6, "b": 6})
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(MixerError, match="is the file system root, your home folder or a folder above it: every "
                                         "file below would be listed; put the images in a folder of their own"):
        scan_folder(Path(os.path.expanduser(data)))
    assert scan_folder(build(home / "data" / "photos", {"a": 1, "b": 1})).classes == ["a", "b"]  # below it: fine


CLI = {
    "extra_folder": ({"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2, "extra": 1}, None,
                     "data folder data/photos has split folders (test/, train/) beside other folders (extra/)"),
    "class_missing_from_train": ({**SPLIT, "val/c": 2}, None,
                                 "data data/photos: class 'c' has images in val/ but none in train/"),
    "val_all_duplicates_of_train": ({"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 2},
                                    lambda root: (copy("train/a/0.png", "val/a/0.png")(root),
                                                  copy("train/b/0.png", "val/b/0.png")(root)),
                                    "data data/photos: the val split holds no image once its 2 duplicate(s)"),
}


@pytest.mark.parametrize("command", ["check", "prepare"])
@pytest.mark.parametrize("case", list(CLI))
def test_the_cli_refuses_with_one_line_and_writes_nothing(tmp_path, monkeypatch, case, command):
    """What the listing decides stops `mixer check` (so `dvc repro` stops there); what only decoding shows
    stops `mixer prepare`, before anything is written."""
    (spec, extra, message) = CLI[case]
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "data", spec, extra)
    write_params(tmp_path / "params.yaml", data="data/photos", num_classes=None, image_shape=[4, 4],
                 patch_shape=[2, 2])
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, [command])
    if command == "check" and case == "val_all_duplicates_of_train":  # known only once decoded
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ") and message in result.output, result.output
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
