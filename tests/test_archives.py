"""`dataset` may be a zip or tar archive of an image folder, read in place (never unpacked): it reads as the
folder would, by the same layout rule (one folder per class, or split folders, under any folder that wraps
them), gives the same split and data hash as the folder unpacked, and refuses or skips what it must: members
that lead out of it, links and devices, names that are not UTF-8, decompression bombs, an unreadable archive."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import mixer.decoding
import mixer.sources
from conftest import write_params
from mixer.data import PrepareConfig, check_source, prepare
from mixer.decoding import decode
from mixer.errors import MixerError
from mixer.sources import open_source, scan_archive, scan_folder
from pipeline.cli import app

FORMATS = ["zip", "tar", "tgz", "tar.xz"]
MODES = {"tar": "w", "tgz": "w:gz", "tar.xz": "w:xz"}


def png(seed, size=(6, 5)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build(root: Path, spec: dict[str, int]) -> Path:
    """`spec`: folder (relative, 'train/cat', 'a/nested') -> how many distinct PNGs it holds; 0: empty."""
    for (i, (rel, n)) in enumerate(spec.items()):
        (root / rel).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            (root / rel / f"{j}.png").write_bytes(png([i, j]))
    return root


def pack(folder: Path, fmt: str, wrap: bool, out: Path | None = None) -> Path:
    """`folder` as an archive beside it (`dogs` -> `dogs.zip`): members named `dogs/...` if `wrap` (as
    `zip -r dogs.zip dogs` or `tar czf dogs.tgz dogs` make them), else relative to the folder itself."""
    out = out or folder.with_name(f"{folder.name}.{fmt}")
    base = folder.parent if wrap else folder
    paths = sorted(folder.rglob("*"))
    if fmt == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in paths:
                archive.write(path, path.relative_to(base).as_posix())
    else:
        with tarfile.open(out, MODES[fmt]) as archive:
            for path in paths:
                archive.add(path, path.relative_to(base).as_posix(), recursive=False)
    return out


def same_source(a, b) -> None:
    assert (a.items, a.classes, a.given_splits, a.split_folders) == (b.items, b.classes, b.given_splits,
                                                                     b.split_folders)
    assert sorted(a.skipped, key=str) == sorted(b.skipped, key=str)


SPLIT = {"train/a": 6, "train/b": 6, "val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2}
LAYOUTS = {
    "class_folders": {"beagle": 6, "poodle": 6, "pug/nested": 6, "pug": 2},
    "split_folders": SPLIT,
    "capitalised_split_folders_without_val": {"Train/a": 8, "Train/b": 8, "Test/a": 2, "Test/b": 2},
}


# ---- the same layouts as a folder, the same split ----------------------------------------------------

@pytest.mark.parametrize("wrap", [True, False], ids=["wrapped", "flat"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_archive_reads_and_prepares_as_its_folder(tmp_path, fmt, layout, wrap):
    """Items, classes and splits given as the folder's, and the same manifest and data hash: each image in the
    same split, under the same path, with the same pixels."""
    folder = build(tmp_path / "dogs", LAYOUTS[layout])
    archive = pack(folder, fmt, wrap)
    (want, got) = (scan_folder(folder), open_source(str(archive), tmp_path / "scratch"))
    same_source(got, want)
    assert got.root == (archive / "dogs" if wrap else archive)
    config = PrepareConfig(image_shape=(4, 4))
    check_source(got, config)
    (a, b) = (prepare(want, tmp_path / "from-folder", config), prepare(got, tmp_path / "from-archive", config))
    assert (tmp_path / "from-archive" / "manifest.csv").read_bytes() == \
        (tmp_path / "from-folder" / "manifest.csv").read_bytes()
    assert b["data_hash"] == a["data_hash"] and b["counts"] == a["counts"]
    assert np.array_equal(np.load(tmp_path / "from-archive" / "images.npy"),
                          np.load(tmp_path / "from-folder" / "images.npy"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_workers_each_read_the_archive_and_large_members_through_a_window(tmp_path, monkeypatch, fmt):
    """Two worker processes, each opening the archive itself; with the in-memory bound at 0 every member is read
    through the archive's stream (tar) or zipfile's reader, never whole, and decodes the same."""
    folder = build(tmp_path / "dogs", {"a": 12, "b": 12, "c": 12})
    archive = pack(folder, fmt, wrap=True)
    config = PrepareConfig(image_shape=(4, 4))
    want = prepare(scan_folder(folder), tmp_path / "folder", config)
    assert prepare(scan_archive(archive), tmp_path / "two", config, workers=2)["data_hash"] == want["data_hash"]
    monkeypatch.setattr(mixer.decoding, "MEMBER_IN_MEMORY", 0)
    assert prepare(scan_archive(archive), tmp_path / "window", config)["data_hash"] == want["data_hash"]


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_folders_that_wrap_everything_are_looked_through_and_hidden_members_ignored(tmp_path, fmt):
    """`zip -r x.zip data/dogs` wraps twice; macOS adds __MACOSX/ and .DS_Store; a file beside the wrapper and
    hidden files at every depth are ignored, as a folder's are."""
    folder = build(tmp_path / "src" / "data" / "dogs", {"beagle": 6, "pug": 6})
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    build(folder / "beagle", {".thumbs": 1})
    (folder / "beagle" / ".hidden.png").write_bytes(png(99))
    build(tmp_path / "src" / "__MACOSX" / "data" / "dogs", {"beagle": 2})
    (tmp_path / "src" / "README.md").write_text("photos\n")
    archive = pack(tmp_path / "src", fmt, wrap=False, out=tmp_path / f"dogs.{fmt}")
    source = scan_archive(archive)
    assert source.root == archive / "data" / "dogs"
    same_source(source, scan_folder(build(tmp_path / "plain", {"beagle": 6, "pug": 6})))


def test_a_single_split_folder_is_never_taken_for_a_wrapper(tmp_path):
    archive = pack(build(tmp_path / "photos", {"train/a": 8, "train/b": 8}), "zip", wrap=False)
    source = scan_archive(archive)
    assert (source.root, source.classes, source.given_splits) == (archive, ["a", "b"], ("train",))


# (id, folders, the message with {root}: the layout rule refuses an archive as it refuses the folder)
REFUSED = [
    ("split_folders_beside_others", {"train/a": 6, "train/b": 6, "test/a": 2, "extra": 1},
     "data {noun} {root} has split folders (test/, train/) beside other folders (extra/)"),
    ("no_train", {"val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2},
     "data {noun} {root} has test/, val/ but no train/"),
    ("val_and_valid", {**SPLIT, "valid/a": 2}, "data {noun} {root} has val/ and valid/: one folder per split"),
    ("case_alike", {"Cat": 6, "cat": 6}, "class folders {root}/Cat and {root}/cat differ only by letter case"),
    ("no_class_folders", {".": 4}, "data {noun} {root} has no class sub-folders"),
    ("one_class", {"cat": 4}, "data {root} has 1 class (cat); a classifier needs at least 2"),
    ("class_missing_from_train", {**SPLIT, "val/c": 2},
     "data {root}: class 'c' has images in val/ but none in train/, so it cannot be learned"),
    ("empty_class_folder", {"a": 6, "b": 6, "owl": 0}, "data {root}: class 'owl' has no images"),
]


@pytest.mark.parametrize(("spec", "message"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_a_layout_refused_as_a_folder_is_refused_as_an_archive(tmp_path, fmt, spec, message):
    folder = build(tmp_path / "photos", spec)
    archive = pack(folder, fmt, wrap=False)
    outcomes = []
    for (source, noun, root) in ((lambda: scan_folder(folder), "folder", folder),
                                 (lambda: scan_archive(archive), "archive", archive)):
        with pytest.raises(MixerError) as error:
            check_source(source(), PrepareConfig(image_shape=(4, 4)))
        outcomes.append(message.format(noun=noun, root=root) in str(error.value))
    assert outcomes == [True, True], str(error.value)


# ---- hostile and odd members -------------------------------------------------------------------------

def add(archive, fmt: str, name: str, data: bytes = b"", kind: str = "file", target: str = "") -> None:
    """One member of any name and type, written as a hostile tool would."""
    if fmt == "zip":
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = ((stat.S_IFLNK | 0o777) if kind == "symlink" else (stat.S_IFREG | 0o644)) << 16
        archive.writestr(info, target.encode() if kind == "symlink" else data)
        return
    info = tarfile.TarInfo(name)
    info.type = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                 "fifo": tarfile.FIFOTYPE, "device": tarfile.CHRTYPE}[kind]
    info.linkname, info.size = target, len(data) if kind == "file" else 0
    archive.addfile(info, io.BytesIO(data) if kind == "file" else None)


def bomb_png(side: int = 30000) -> bytes:
    """A valid PNG header declaring side × side pixels (far over Image.MAX_IMAGE_PIXELS), in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# (id, formats, the member(s) added to dogs/ ..., the skip reported: (path, reason start), where it is known)
HOSTILE = [
    ("dot_dot", FORMATS, [("dogs/a/../../evil.png", png(1))], ("a/../../evil.png", "path leads out of the archive"),
     "listing"),
    ("dot_dot_at_the_top", FORMATS, [("../evil.png", png(1))], ("../../evil.png", "path leads out of the archive"),
     "listing"),
    ("absolute", FORMATS, [("/tmp/evil.png", png(1))], ("/tmp/evil.png", "absolute path in the archive"), "listing"),
    ("symlink", FORMATS, [("dogs/a/link.png", b"", "symlink", "../b/0.png")],
     ("a/link.png", "symbolic link; links in an archive are not followed"), "listing"),
    ("symlink_to_a_folder", FORMATS, [("dogs/a/etc", b"", "symlink", "/etc")],
     ("a/etc", "symbolic link; links in an archive are not followed"), "listing"),
    ("hardlink", ["tar", "tgz"], [("dogs/a/hard.png", b"", "hardlink", "dogs/b/0.png")],
     ("a/hard.png", "hard link; links in an archive are not followed"), "listing"),
    ("fifo", ["tar", "tgz"], [("dogs/a/pipe.png", b"", "fifo")], ("a/pipe.png", "not a regular file (FIFO)"),
     "listing"),
    ("device", ["tar"], [("dogs/a/tty.png", b"", "device")], ("a/tty.png", "not a regular file (character device)"),
     "listing"),
    ("not_utf8", ["tar", "tgz"], [(b"dogs/a/caf\xe9.png".decode("utf-8", "surrogateescape"), png(1))],
     ("a/caf\\xe9.png", "name is not UTF-8"), "listing"),
    ("not_an_image", FORMATS, [("dogs/a/notes.png", b"just text")], ("a/notes.png", "not an image"), "decoding"),
    ("truncated_image", FORMATS, [("dogs/a/cut.png", png(1, (40, 40))[:60])], ("a/cut.png", "cannot decode"),
     "decoding"),
    ("decompression_bomb", FORMATS, [("dogs/a/bomb.png", bomb_png())], ("a/bomb.png", "decompression bomb"),
     "decoding"),
    ("listed_twice", FORMATS, [("dogs/a/0.png", png(7))],
     ("a/0.png", "an earlier member of the same name; the last one is read"), "listing"),
]


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile's, writing listed_twice
@pytest.mark.parametrize(("fmt", "members", "skip", "when"),
                         [pytest.param(fmt, *c[2:], id=f"{c[0]}-{fmt}") for c in HOSTILE for fmt in c[1]])
def test_a_hostile_or_odd_member_is_skipped_with_its_reason_and_never_read(tmp_path, fmt, members, skip, when):
    out = tmp_path / f"dogs.{fmt}"
    with (zipfile.ZipFile(out, "w") if fmt == "zip" else tarfile.open(out, MODES[fmt], format=tarfile.GNU_FORMAT)) \
            as archive:
        for (i, (folder, n)) in enumerate({"a": 6, "b": 6}.items()):
            for j in range(n):
                add(archive, fmt, f"dogs/{folder}/{j}.png", png([i, j]))
        for member in members:
            add(archive, fmt, *member)
    source = scan_archive(out)
    assert source.classes == ["a", "b"] and source.root == out / "dogs"
    (path, reason) = skip
    listed = [s for s in source.skipped if s["path"] == path and s["reason"].startswith(reason)]
    assert (len(listed), path in dict(source.items)) == ((1, skip[1].startswith("an earlier")) if when == "listing"
                                                         else (0, True)), source.skipped
    report = prepare(source, tmp_path / "cache", PrepareConfig(image_shape=(4, 4), val_fraction=0.2))
    assert [s for s in report["skipped"] if s["path"] == path and s["reason"].startswith(reason)], report["skipped"]
    assert sum(sum(c.values()) for c in report["counts"].values()) == 12  # the twelve good images, no more
    if skip[1].startswith("an earlier"):  # the later copy is the one read, as unpacking leaves it
        (tmp_path / "later.png").write_bytes(members[0][1])
        manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
        assert manifest.set_index("path").loc["a/0.png", "hash"] == decode(tmp_path / "later.png", (4, 4))[1]
    with pytest.raises(MixerError, match=r"\(strict: true\)"):
        prepare(scan_archive(out), tmp_path / "strict", PrepareConfig(image_shape=(4, 4), val_fraction=0.2,
                                                                      strict=True))


def test_a_zip_name_without_the_utf8_flag_is_read_as_utf8_or_skipped(tmp_path):
    """Most zip tools write UTF-8 names without the flag (zipfile reads them as cp437): read as UTF-8; a name that
    is not UTF-8 either (here byte 0xE9, Latin-1's é) is skipped with its reason."""
    out = tmp_path / "dogs.zip"
    with zipfile.ZipFile(out, "w") as archive:
        for (i, folder) in enumerate("ab"):
            for j in range(6):
                archive.writestr(f"dogs/{folder}/{j}.png", png([i, j]))
        archive.writestr("dogs/a/cafX.png", png(8))
        archive.writestr("dogs/b/naYYve.png", png(9))
    data = out.read_bytes().replace(b"cafX", b"caf\xe9").replace(b"naYYve", "naïve".encode())  # header and directory
    out.write_bytes(data)
    source = scan_archive(out)
    assert {"path": "a/caf\\xe9.png", "reason": "name is not UTF-8"} in source.skipped
    assert "b/naïve.png" in dict(source.items)
    report = prepare(source, tmp_path / "cache", PrepareConfig(image_shape=(4, 4), val_fraction=0.2))
    assert sum(sum(c.values()) for c in report["counts"].values()) == 13


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_a_member_that_declares_a_huge_size_is_never_inflated(tmp_path, fmt):
    """A zip or gzip bomb: 200 MB of zeros named as an image, a few hundred kB on disk. It is read through the
    archive's stream, not into memory, and PIL gives up after its first bytes: not an image."""
    out = tmp_path / f"dogs.{fmt}"
    zeros, chunks = b"\0" * 2**20, 200
    with (zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) if fmt == "zip" else tarfile.open(out, "w:gz")) as archive:
        for (i, folder) in enumerate("ab"):
            for j in range(6):
                add(archive, "zip" if fmt == "zip" else "tar", f"dogs/{folder}/{j}.png", png([i, j]))
        if fmt == "zip":
            with archive.open("dogs/a/bomb.png", "w", force_zip64=True) as member:
                for _ in range(chunks):
                    member.write(zeros)
        else:
            info = tarfile.TarInfo("dogs/a/bomb.png")
            info.size = chunks * len(zeros)
            archive.addfile(info, io.BufferedReader(io.BytesIO(zeros * chunks)))
    assert out.stat().st_size < 2 * 2**20
    source = scan_archive(out)
    assert source.members["a/bomb.png"].size == chunks * 2**20
    tracemalloc.start()
    try:
        report = prepare(source, tmp_path / "cache", PrepareConfig(image_shape=(4, 4), val_fraction=0.2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {"path": "a/bomb.png", "reason": "not an image"} in report["skipped"]
    assert peak < 32 * 2**20, peak


@pytest.mark.parametrize(("limit", "value", "message"), [
    ("MAX_MEMBERS", 10, "lists more than 10 members: not a data set to read in place"),
    ("MAX_ARCHIVE_BYTES", 1000, "declares more than 1,000 bytes of files: not a data set of images (a "
                                "decompression bomb?)"),
])
@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_an_archive_over_the_sanity_limits_is_refused_before_anything_is_read(tmp_path, monkeypatch, fmt, limit,
                                                                              value, message):
    archive = pack(build(tmp_path / "dogs", {"a": 6, "b": 6}), fmt, wrap=True)
    monkeypatch.setattr(mixer.sources, limit, value)
    with pytest.raises(MixerError, match="^" + re.escape(f"data archive {archive} {message}")):
        scan_archive(archive)


def corrupt(tmp_path: Path, fmt: str, how: str) -> Path:
    good = pack(build(tmp_path / "dogs", {"a": 6, "b": 6}), fmt, wrap=True)
    data = good.read_bytes()
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes({"garbage": os.urandom(3000), "empty": b"", "truncated": data[:len(data) // 2]}[how])
    return bad


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated"])
@pytest.mark.parametrize("fmt", ["zip", "tar", "tgz"])
def test_an_unreadable_archive_is_one_error_naming_it(tmp_path, fmt, how):
    bad = corrupt(tmp_path, fmt, how)
    with pytest.raises(MixerError) as error:
        scan_archive(bad)
    kind = "zip" if fmt == "zip" else "tar"
    assert str(error.value).startswith(f"data archive {bad} is not a readable {kind} archive (")
    assert "\n" not in str(error.value)


def test_a_missing_archive_and_an_unknown_file_are_one_error(tmp_path):
    with pytest.raises(MixerError, match="^data archive .*nothing.zip does not exist$"):
        open_source(str(tmp_path / "nothing.zip"), tmp_path)
    (tmp_path / "photos.rar").write_bytes(b"Rar!")
    with pytest.raises(MixerError, match=r"photos.rar is neither a folder, a CSV file nor an archive \(.zip, .tar"):
        open_source(str(tmp_path / "photos.rar"), tmp_path)
    folder = build(tmp_path / "looks.zip", {"a": 6, "b": 6})  # a folder whose name ends in .zip is a folder
    assert open_source(str(folder), tmp_path).classes == ["a", "b"]


# ---- through the CLI ---------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    build(tmp_path / "data" / "dogs", {"beagle": 10, "poodle": 10, "pug": 10})
    write_params(tmp_path / "params.yaml", data="data/dogs", image_shape=[8, 8], patch_shape=[2, 2], num_classes=3,
                 num_steps=2, warmup_step=0, val_fraction=0.2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_mixer_prepare_on_an_archive_writes_the_folders_split(project, fmt):
    """`cd data && zip -r dogs.zip dogs` (or tar czf): check passes, under dvc repro too (the archive is in data/),
    and prepare's manifest and data hash are the folder's, byte for byte."""
    runner = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "250"})
    result = runner.invoke(app, ["prepare", "--workers", "1"])
    assert result.exit_code == 0, result.output
    folder_manifest = (project / "prepared" / "manifest.csv").read_bytes()
    folder_hash = json.loads((project / "prepared" / "prepared.json").read_text())["data_hash"]
    archive = pack(project / "data" / "dogs", fmt, wrap=True)
    shutil.rmtree(project / "data" / "dogs")  # DVC tracks the one file; the folder is gone
    write_params(project / "params.yaml", data=f"data/{archive.name}", image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3, num_steps=2, warmup_step=0, val_fraction=0.2)
    for env in ({}, {"DVC_STAGE": "check"}):
        checked = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "250", **env}).invoke(app, ["check"])
        assert checked.exit_code == 0 and f"dataset data/{archive.name}" in checked.output, checked.output
    result = runner.invoke(app, ["prepare", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "prepared 3 classes" in result.output
    assert (project / "prepared" / "manifest.csv").read_bytes() == folder_manifest
    assert json.loads((project / "prepared" / "prepared.json").read_text())["data_hash"] == folder_hash


@pytest.mark.parametrize("command", ["check", "prepare"])
def test_an_unreadable_archive_is_one_line_from_check_and_prepare(project, command):
    (project / "data" / "dogs.zip").write_bytes(b"PK\x03\x04 not really")
    write_params(project / "params.yaml", data="data/dogs.zip", num_classes=None)
    result = CliRunner(env={"NO_COLOR": "1", "COLUMNS": "250"}).invoke(app, [command])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: data archive data/dogs.zip is not a readable zip archive (")
    assert not (project / "prepared").exists()


@pytest.mark.parametrize("fmt", ["zip", "tgz"])
def test_an_item_opens_from_the_archive_as_from_the_folder(tmp_path, fmt):
    """`Source.open`, for readers of a few items (mixer.survey's opener): the same bytes either way."""
    folder = build(tmp_path / "dogs", {"a": 3, "b": 3})
    (archive, plain) = (scan_archive(pack(folder, fmt, wrap=True)), scan_folder(folder))
    for (rel, _) in plain.items:
        with archive.open(rel) as a, plain.open(rel) as b:
            assert a.read() == b.read()
    mixer.decoding.close_archives()
