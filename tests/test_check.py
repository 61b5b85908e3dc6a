"""`mixer check` refuses every data source that `mixer prepare` would refuse, and with the same line,
before any stage runs (under `dvc repro` nothing has been touched yet); under DVC the data must lie in
data/, the folder dvc.yaml tracks, so a change to it is never silently stale."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from conftest import make_image_folder, write_params
from pipeline.cli import app


def one_class(root):
    make_image_folder(root / "data" / "photos", {"cat": 4})
    return {"data": "data/photos"}


def no_class_folders(root):
    make_image_folder(root / "data", {"photos": 4})  # images straight in data/photos: no class folders
    return {"data": "data/photos"}


def an_empty_class(root):
    make_image_folder(root / "data" / "photos", {"cat": 4, "dog": 4})
    (root / "data" / "photos" / "owl").mkdir()
    return {"data": "data/photos", "num_classes": None}


def too_many_classes(root):
    make_image_folder(root / "data" / "photos", {"cat": 4, "dog": 4, "owl": 4})
    return {"data": "data/photos", "num_classes": 2}


def too_few_classes(root):
    make_image_folder(root / "data" / "photos", {"cat": 4, "dog": 4, "owl": 4})
    return {"data": "data/photos", "num_classes": 10}


def missing(root):
    return {"data": "data/nothing-here"}


BAD = {
    one_class: "data data/photos has 1 class (cat); a classifier needs at least 2",
    no_class_folders: "data folder data/photos has no class sub-folders: put each class's images in a folder of its own",
    an_empty_class: "data data/photos: class 'owl' has no images; add images or remove it",
    too_many_classes: "num_classes is 2 but data data/photos has 3 classes (cat, dog, owl); set num_classes: 3, or null",
    too_few_classes: "num_classes is 10 but data data/photos has 3 classes (cat, dog, owl); set num_classes: 3",
    missing: "data folder data/nothing-here does not exist",
}


@pytest.mark.parametrize("command", ["check", "prepare"])
@pytest.mark.parametrize("case", list(BAD), ids=lambda f: f.__name__)
def test_a_bad_data_source_is_one_line_from_check_and_prepare_alike(tmp_path, monkeypatch, case, command):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", **case(tmp_path))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(app, [command])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert BAD[case] in result.output
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_good_folder_passes_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "data" / "photos", {"cat": 6, "dog": 6})  # 6: val_fraction 0.1 gives val one each
    write_params(tmp_path / "params.yaml", data="data/photos", num_classes=None)
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("where", ["outside", "linked"])
def test_under_dvc_data_outside_the_tracked_folder_is_refused_with_the_fix(tmp_path, monkeypatch, where):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    make_image_folder(tmp_path / "elsewhere", {"cat": 6, "dog": 6})
    data = str(tmp_path / "elsewhere")
    if where == "linked":
        (project / "data").mkdir()
        os.symlink(tmp_path / "elsewhere", project / "data" / "photos")
        data = "data/photos"
    write_params(project / "params.yaml", data=data, num_classes=None)
    assert CliRunner().invoke(app, ["check"]).exit_code == 0  # by hand, data may be anywhere
    result = CliRunner(env={"DVC_STAGE": "check"}).invoke(app, ["check"])
    assert result.exit_code == 2, result.output
    if where == "outside":
        assert f"dataset {data} is outside data/, the folder dvc.yaml tracks" in result.output
        assert f"cp -r {data} data/) and set dataset: data/elsewhere" in result.output
    else:
        assert "dataset data/photos is a link out of data/" in result.output
        assert f"rm data/photos && cp -r {tmp_path / 'elsewhere'} data/photos" in result.output


@pytest.mark.parametrize("layout", [("train", "val", "test"), ("train", "val"), ("train", "validation"), ("train",)])
def test_a_pre_split_folder_is_used_as_the_split(tmp_path, monkeypatch, layout):
    """root/train/<class>, root/val/<class> (timm's and torchvision's layout): two or three classes, not the
    split names; each image stays in its folder's split, and a split it lacks is cut from train/."""
    import json

    from conftest import make_photo_folder

    monkeypatch.chdir(tmp_path)
    sizes = {"train": 10, "val": 3, "valid": 3, "validation": 3, "test": 4}
    for split in layout:
        make_photo_folder(tmp_path / "data" / "photos" / split, {"cat": sizes[split], "dog": sizes[split]},
                          seed=len(split))
    write_params(tmp_path / "params.yaml", data="data/photos", num_classes=None, image_shape=[12, 12],
                 val_fraction=0.2, test_fraction=0.2)
    assert CliRunner().invoke(app, ["check"]).exit_code == 0
    result = CliRunner().invoke(app, ["prepare", "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "reports" / "data.json").read_text())
    assert report["classes"] == ["cat", "dog"]
    manifest = __import__("pandas").read_csv(tmp_path / "prepared" / "manifest.csv")
    named = {"validation": "val"}
    missing = {"val", "test"} - {named.get(s, s) for s in layout}
    for split in layout:  # every image of a given split folder is in that split (train/'s: or one cut from it)
        rows = manifest[manifest["path"].str.startswith(f"{split}/")]
        allowed = {named.get(split, split)} | (missing if split == "train" else set())
        assert len(rows) == 2 * sizes[split] and set(rows["split"]) == allowed, split
    for split in missing:  # cut from train/, a few per class
        rows = manifest[manifest["split"] == split]
        assert len(rows) == 4 and set(rows["path"].str.split("/").str[0]) == {"train"}, split
    assert json.loads((tmp_path / "prepared" / "prepared.json").read_text())["split"]["given"] == \
        sorted({named.get(s, s) for s in layout})


def test_a_pre_split_folders_class_linked_out_of_it_is_refused_as_in_a_plain_folder(tmp_path, monkeypatch):
    from conftest import make_photo_folder

    monkeypatch.chdir(tmp_path)
    make_photo_folder(tmp_path / "data" / "photos" / "train", {"cat": 4})
    make_photo_folder(tmp_path / "elsewhere", {"dog": 4})
    os.symlink(tmp_path / "elsewhere" / "dog", tmp_path / "data" / "photos" / "train" / "dog")
    write_params(tmp_path / "params.yaml", data="data/photos", num_classes=None)
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 2, result.output
    assert "class folder data/photos/train/dog is a link out of the data folder" in result.output
