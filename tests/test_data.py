"""Sources, decoding, splits and the cache: messy folders keep or report every file."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT, make_image_folder
from mixer.data import PrepareConfig, load_split, open_prepared, prepare
from mixer.decoding import decode, shrink
from mixer.errors import MixerError
from mixer.sources import export_digits, open_source, read_csv, scan_folder


def config(**kw):  # val_fraction 0.25: the tiny folders here still give every split an image
    return PrepareConfig(**{"image_shape": (8, 8), "val_fraction": 0.25, **kw})


def test_digits_become_an_image_folder(tmp_path):
    root = export_digits(tmp_path / "digits")
    source = scan_folder(root)
    assert source.classes == [str(i) for i in range(10)]
    assert len(source.items) == 1797
    assert Image.open(root / "0" / "0000.png").size == (8, 8)


def test_every_mode_becomes_rgb(tmp_path):
    modes = {
        "rgb.png": Image.new("RGB", (6, 4), (10, 20, 30)),
        "grey.png": Image.new("L", (6, 4), 77),
        "palette.gif": Image.new("RGB", (6, 4), (200, 0, 0)).convert("P"),
        "rgba.png": Image.new("RGBA", (6, 4), (0, 0, 255, 0)),     # fully transparent → background
        "la.png": Image.new("LA", (6, 4), (0, 255)),
        "sixteen.png": Image.fromarray(np.full((4, 6), 65535, dtype=np.uint16)),
        "cmyk.jpg": Image.new("CMYK", (6, 4), (0, 0, 0, 0)),
        "bmp.bmp": Image.new("RGB", (6, 4), (1, 2, 3)),
        "webp.webp": Image.new("RGB", (6, 4), (9, 9, 9)),
        "tiff.tiff": Image.new("RGB", (6, 4), (5, 6, 7)),
    }
    for (name, image) in modes.items():
        image.save(tmp_path / name)
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    for name in modes:
        array, _ = decode(tmp_path / name, (4, 6))
        assert array.shape == (4, 6, 3) and array.dtype == np.uint8, name
    assert decode(tmp_path / "rgba.png", (4, 6))[0][0, 0].tolist() == [255, 255, 255]
    assert decode(tmp_path / "sixteen.png", (4, 6))[0][0, 0].tolist() == [255, 255, 255]
    assert decode(tmp_path / "grey.png", (4, 6))[0][0, 0].tolist() == [77, 77, 77]
    assert decode(tmp_path / "cmyk.jpg", (4, 6))[0].mean() > 250  # CMYK zero ink is white


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    # a wide image, red on the left half, stored with orientation 6 (display rotated 90° clockwise)
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    array, _ = decode(tmp_path / "rotated.jpg", (8, 4))  # displayed: tall, red on top
    assert array[1, :, 0].mean() > 200 and array[-2, :, 0].mean() < 60
    # and so it lands in the cache
    root = make_image_folder(tmp_path / "data", {"a": 3, "b": 3}, size=(8, 4))
    (tmp_path / "rotated.jpg").rename(root / "a" / "rotated.jpg")
    prepare(scan_folder(root), tmp_path / "cache", PrepareConfig(image_shape=(8, 4), val_fraction=0.25,
                                                                 test_fraction=0.2))
    manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    row = int(manifest.loc[manifest["path"] == "a/rotated.jpg", "row"].iloc[0])
    cached = np.load(tmp_path / "cache" / "images.npy", mmap_mode="r")[row]
    assert cached[1, :, 0].mean() > 200 and cached[-2, :, 0].mean() < 60


def test_resize_policies(tmp_path):
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # the middle third white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    stretched, _ = decode(tmp_path / "wide.png", (10, 10), "stretch")
    cropped, _ = decode(tmp_path / "wide.png", (10, 10), "center_crop")
    assert cropped.mean() > 240            # only the white centre survives the crop
    assert 60 < stretched.mean() < 120     # the whole image squeezed in


def messy_folder(root):
    make_image_folder(root, {"cat": 6, "dog": 6})
    nested = root / "cat" / "indoor" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (5, 5), (1, 1, 1)).save(nested / "NESTED.JPG")         # upper-case extension
    (root / "ünïcødé 猫").mkdir()
    for i in range(6):
        Image.new("RGB", (5, 5), (i * 20, 3, 3)).save(root / "ünïcødé 猫" / f"{i}.Png")
    (root / "dog" / "notes.txt").write_text("not an image")                 # other extension: ignored
    (root / "dog" / ".hidden.png").write_bytes(b"junk")                     # hidden: ignored
    (root / ".git").mkdir()
    (root / ".git" / "x.png").write_bytes(b"junk")                          # hidden folder: ignored
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.jpeg").write_text("hello")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (3, 4, 5)).save(buffer, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buffer.getvalue()[:100])
    return root


def test_messy_folder_keeps_counts_and_reports_skips(tmp_path):
    root = messy_folder(tmp_path / "data")
    source = scan_folder(root)
    assert source.classes == ["cat", "dog", "ünïcødé 猫"]
    assert "cat/indoor/deeper/NESTED.JPG" in {p for (p, _) in source.items}
    assert not any(".hidden" in p or ".git" in p or p.endswith(".txt") for (p, _) in source.items)
    report = prepare(source, tmp_path / "cache", config(val_fraction=0.2, test_fraction=0.2))
    skipped = {d["path"]: d["reason"] for d in report["skipped"]}
    assert set(skipped) == {"dog/corrupt.png", "dog/empty.jpg", "dog/text.jpeg", "cat/truncated.jpg"}
    kept = {c: sum(report["counts"][s][c] for s in report["counts"]) for c in report["classes"]}
    assert kept == {"cat": 7, "dog": 6, "ünïcødé 猫": 6}
    manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    assert len(manifest) == 19 and manifest["path"].is_unique


def test_strict_makes_a_bad_file_an_error(tmp_path):
    root = messy_folder(tmp_path / "data")
    # files are decoded in sorted order: cat/truncated.jpg is the first bad one
    with pytest.raises(MixerError, match=r"/data/cat/truncated\.jpg: cannot decode \(.*\) \(strict: true\)$"):
        prepare(scan_folder(root), tmp_path / "cache", config(strict=True))


def test_duplicates_across_splits_are_reported_and_dropped(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 10, "b": 10})
    for i in range(10):  # copy every 'a' image under another name: some copies land in other splits
        (root / "a" / f"copy{i:03d}.png").write_bytes((root / "a" / f"img{i:03d}.png").read_bytes())
    report = prepare(scan_folder(root), tmp_path / "c1", config(drop_duplicates=False))
    assert report["duplicates"], "20 files in 10 pairs across three splits must collide somewhere"
    manifest = pd.read_csv(tmp_path / "c1" / "manifest.csv")
    split_of = dict(zip(manifest["path"], manifest["split"]))
    order = {"train": 0, "val": 1, "test": 2}
    for d in report["duplicates"]:
        assert split_of[d["path"]] == d["split"] and order[d["split"]] > order[d["same_as_split"]]
        assert (root / d["path"]).read_bytes() == (root / d["same_as"]).read_bytes()
    dropped = prepare(scan_folder(root), tmp_path / "c2", config(drop_duplicates=True))
    remaining = set(pd.read_csv(tmp_path / "c2" / "manifest.csv")["path"])
    assert not {d["path"] for d in report["duplicates"]} & remaining
    assert dropped["duplicates"] == report["duplicates"]


def test_cache_reads_back_without_decoding(tmp_path):
    root = make_image_folder(tmp_path / "data", {"a": 5, "b": 5}, size=(8, 8))
    prepare(scan_folder(root), tmp_path / "cache", config(), workers=2)
    train = load_split(tmp_path / "cache", "train")
    manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    first = manifest[manifest["split"] == "train"].iloc[0]
    expected = np.asarray(Image.open(root / first["path"]).convert("RGB").resize((8, 8), Image.Resampling.BICUBIC))
    assert np.array_equal(train.images[0], expected)
    assert np.load(tmp_path / "cache" / "images.npy", mmap_mode="r").dtype == np.uint8
    info = json.loads((tmp_path / "cache" / "prepared.json").read_text())
    assert info["classes"] == ["a", "b"] and info["image_shape"] == [8, 8] and info["resize"] == "stretch"
    assert open_prepared(tmp_path / "cache").data_hash == info["data_hash"]


def test_csv_sources(tmp_path):
    root = make_image_folder(tmp_path / "flat", {"x": 4, "y": 4})
    rows = [(f"{c}/img{i:03d}.png", c) for c in "xy" for i in range(4)]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "labels.csv", index=False)
    source = read_csv(root / "labels.csv")
    assert source.classes == ["x", "y"] and len(source.items) == 8
    # the Kaggle dog-breed layout: labels.csv with id,breed and train/<id>.jpg
    kaggle = tmp_path / "kaggle"
    (kaggle / "train").mkdir(parents=True)
    for (i, breed) in enumerate(["beagle", "pug", "beagle", "pug"]):
        Image.new("RGB", (9, 9), (i, i, i)).save(kaggle / "train" / f"id{i}.jpg")
    pd.DataFrame({"id": [f"id{i}" for i in range(4)], "breed": ["beagle", "pug", "beagle", "pug"]}).to_csv(
        kaggle / "labels.csv", index=False)
    source = open_source(str(kaggle / "labels.csv"), tmp_path)
    assert source.classes == ["beagle", "pug"] and ("train/id0.jpg", "beagle") in source.items


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "data folder {root} does not exist"),
    ("empty", "data folder {root} has no class sub-folders"),
    ("one_class", "has 1 class (a); a classifier needs at least 2"),
    ("no_usable", "class 'b' in {root} has no usable image"),
    ("columns", "needs columns path,label or id,breed; it has file,kind"),
    ("unlabelled", "1 labelled image(s) do not exist, e.g. 'b/ghost.png'"),
    ("escape", "path '../outside.png' escapes the data folder"),
    ("num_classes", "num_classes is 5 but data {root} has 2 classes"),
    ("nul", "line 3: path 'b/img\\x00.png' holds a NUL byte, which no file name can hold; fix that row"),
])
def test_errors_name_the_culprit(tmp_path, case, message):
    root = tmp_path / "data"
    target = root
    kw = {}
    if case == "empty":
        root.mkdir()
    elif case == "one_class":
        make_image_folder(root, {"a": 3})
    elif case == "no_usable":
        make_image_folder(root, {"a": 3})
        (root / "b").mkdir()
        (root / "b" / "bad.png").write_bytes(b"nope")
    elif case in ("columns", "unlabelled", "escape", "nul"):
        make_image_folder(root, {"a": 2, "b": 2})
        table = {"columns": "file,kind\na/img000.png,a\n", "unlabelled": "path,label\nb/ghost.png,b\n",
                 "escape": "path,label\n../outside.png,a\n",
                 "nul": "path,label\na/img000.png,a\nb/img\x00.png,b\n"}[case]
        (root / "labels.csv").write_text(table)
        target = root / "labels.csv"
    elif case == "num_classes":
        make_image_folder(root, {"a": 3, "b": 3})
        kw = {"num_classes": 5}
    with pytest.raises(MixerError) as caught:
        prepare(open_source(str(target), tmp_path / "scratch"), tmp_path / "cache", config(**kw))
    assert message.format(root=root) in str(caught.value)


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "data", {"a": 3, "b": 3}, size=(8, 8))
    Image.new("RGB", (30, 30)).save(root / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 8×8 fits; 30×30 = 900 is a 'bomb' here
    with pytest.raises(ValueError, match="decompression bomb"):
        decode(root / "a" / "huge.png", (8, 8))
    report = prepare(scan_folder(root), tmp_path / "cache", config())
    assert [d["path"] for d in report["skipped"]] == ["a/huge.png"]
    assert "decompression bomb" in report["skipped"][0]["reason"]


# ---- what a careless user or an attacker puts in a data folder ----------------------------------

def test_a_link_loop_neither_relabels_nor_duplicates(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cat": 6, "dog": 6})
    (root / "dog" / "loop").symlink_to("..")           # dog/loop/cat/... would relabel cats as dogs
    (root / "dog" / "self").symlink_to(".")            # and dog/self/self/... never ends
    source = scan_folder(root)
    assert len(source.items) == 12 and dict(source.items)["cat/img000.png"] == "cat"
    assert {s["path"] for s in source.skipped} == {"dog/loop", "dog/self"}
    assert all("already scanned" in s["reason"] for s in source.skipped)
    report = prepare(source, tmp_path / "cache", config(test_fraction=0.2, val_fraction=0.2))
    assert {s: sum(c.values()) for (s, c) in report["counts"].items()} == {"train": 8, "val": 2, "test": 2}


def test_special_files_are_skipped_never_opened(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cat": 4, "dog": 4})
    os.mkfifo(root / "cat" / "pipe.png")               # opening it would block forever
    (root / "dog" / "zeros.png").symlink_to("/dev/zero")  # reading it would never end
    (root / "dog" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "dog" / "knot.png").symlink_to("knot.png")
    source = scan_folder(root)
    reasons = {s["path"]: s["reason"] for s in source.skipped}
    assert reasons == {"cat/pipe.png": "not a regular file (FIFO)",
                       "dog/zeros.png": "not a regular file (character device)",
                       "dog/gone.png": "broken link", "dog/knot.png": "link loop"}
    assert len(source.items) == 8
    report = prepare(source, tmp_path / "cache", config(test_fraction=0.25))
    assert len(report["skipped"]) == 4
    for path in (root / "cat" / "pipe.png", Path("/dev/zero")):
        with pytest.raises(ValueError, match="not a regular file"):
            decode(path, (8, 8))
    with pytest.raises(MixerError, match="cat/pipe.png: not a regular file \\(FIFO\\) \\(strict: true\\)"):
        prepare(source, tmp_path / "strict", config(strict=True, test_fraction=0.25))


def test_names_that_are_not_utf8(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cat": 4, "dog": 4})
    Image.new("RGB", (8, 8)).save(os.fsencode(root / "cat") + b"/caf\xe9.png")  # Latin-1 bytes
    source = scan_folder(root)
    assert source.skipped == [{"path": "cat/caf\\xe9.png", "reason": "file name is not UTF-8"}]
    report = prepare(source, tmp_path / "cache", config(test_fraction=0.25))
    json.dumps(report).encode("utf-8")  # every name in the report is text
    (root / "cat").rename(os.fsdecode(os.fsencode(root) + b"/ch\xe2t"))
    with pytest.raises(MixerError, match=r"class folder .*/ch\\xe2t has a name that is not UTF-8; rename it"):
        scan_folder(root)


OUTSIDE_FOLDER = "link to a folder outside the data folder; not followed"
OUTSIDE_FILE = "link to a file outside the data folder; not read"


@pytest.mark.parametrize(("case", "extra", "skipped"), [
    ("folder_link_outside", [], {"cat/elsewhere": OUTSIDE_FOLDER}),
    ("folder_link_outside_deeper", ["cat/pool/p.png"], {"cat/pool/away": OUTSIDE_FOLDER}),  # via one inside
    ("file_link_outside", [], {"dog/far.png": OUTSIDE_FILE}),
    ("links_inside_through_a_linked_root", ["cat/pool/p.png", "dog/near.png"], {}),  # followed, as before
    ("folder_not_utf8", [], {"cat/\\xff": "folder name is not UTF-8; not scanned"}),
])
def test_a_walk_stays_in_the_data_folder_and_reports_what_it_leaves(tmp_path, case, extra, skipped):
    """A folder link out of the data folder would put files nobody chose into the cache (and a DVC push)."""
    root = make_image_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    outside = make_image_folder(tmp_path / "outside", {"x": 2})
    (root / ".pool").mkdir()  # hidden: not a class, but inside the data folder
    Image.new("RGB", (8, 8)).save(root / ".pool" / "p.png")
    target = root
    if case == "folder_link_outside":
        (root / "cat" / "elsewhere").symlink_to(outside / "x")
    elif case == "folder_link_outside_deeper":
        (root / "cat" / "pool").symlink_to("../.pool")
        (root / ".pool" / "away").symlink_to(outside / "x")
    elif case == "file_link_outside":
        (root / "dog" / "far.png").symlink_to(outside / "x" / "img000.png")
    elif case == "links_inside_through_a_linked_root":
        (root / "cat" / "pool").symlink_to(root / ".pool")  # absolute: inside only once the root is resolved
        (root / "dog" / "near.png").symlink_to("../cat/img000.png")
        target = tmp_path / "alias"
        target.symlink_to(root)
    else:
        folder = os.fsencode(root / "cat") + b"/\xff"
        os.mkdir(folder)
        Image.new("RGB", (8, 8)).save(folder + b"/a.png")
    source = scan_folder(target)
    plain = [f"{c}/img{i:03d}.png" for c in ("cat", "dog") for i in range(3)]
    assert [p for (p, _) in source.items] == sorted(plain + extra)
    assert {s["path"]: s["reason"] for s in source.skipped} == skipped
    prepare(source, tmp_path / "cache", config(test_fraction=0.25, val_fraction=0.25))  # and it prepares


def test_names_with_line_breaks_read_back_as_written(tmp_path):
    """Found by tests/test_properties.py: a file named 'a\rb.png' split its manifest row in two."""
    root = make_image_folder(tmp_path / "data", {"cat": 4, "dog\r\n2": 4})
    for (i, name) in enumerate(["a\rb.png", "c\x0cd.png", "e\nf.png", 'g",h.png']):
        (root / "cat" / f"img{i:03d}.png").rename(root / "cat" / name)
    prepare(scan_folder(root), tmp_path / "cache", config(test_fraction=0.25))
    prepared = open_prepared(tmp_path / "cache")
    assert prepared.classes == ["cat", "dog\r\n2"]
    assert sorted(prepared.table["path"]) == sorted(
        ["cat/a\rb.png", "cat/c\x0cd.png", "cat/e\nf.png", 'cat/g",h.png'] + [f"dog\r\n2/img{i:03d}.png" for i in range(4)])


def test_csv_repeated_rows_count_once_and_conflicting_labels_are_reported(tmp_path):
    root = make_image_folder(tmp_path / "flat", {"x": 4, "y": 4})
    rows = [(f"{c}/img{i:03d}.png", c) for c in "xy" for i in range(4)]
    rows += [rows[0], rows[0], ("y/img001.png", "x"), ("y/img001.png", "y")]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(root / "labels.csv", index=False)
    source = read_csv(root / "labels.csv")
    assert len(source.items) == 8 and source.duplicate_rows == 3  # rows[0] twice more, (y/img001, y) once more
    assert source.label_conflicts == [{"path": "y/img001.png", "labels": ["y", "x"], "kept": "y"}]
    report = prepare(source, tmp_path / "cache", config(test_fraction=0.25))
    assert sum(sum(c.values()) for c in report["counts"].values()) == 8  # the repeated image is kept once
    assert report["label_conflicts"] == source.label_conflicts and report["duplicate_rows"] == 3
    with pytest.raises(MixerError, match="'y/img001.png' is labelled 'y' and 'x' \\(strict: true"):
        prepare(source, tmp_path / "strict", config(strict=True, test_fraction=0.25))
    os.mkfifo(root / "x" / "pipe.png")
    (root / "labels.csv").write_text("path,label\nx/pipe.png,x\n")
    with pytest.raises(MixerError, match="are not regular files, e.g. 'x/pipe.png' \\(FIFO\\)"):
        read_csv(root / "labels.csv")


MEASURE = """
import resource, sys
sys.path.insert(0, {root!r})
from mixer.decoding import decode
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
array, _ = decode({path!r}, (16, 16))
assert array.shape == (16, 16, 3)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_huge_sixteen_bit_png_decodes_in_bounded_memory(tmp_path):
    """9400 x 9400 16-bit pixels (a 172 KB file): 177 MB to hold, 2.5 GB with a float64 conversion."""
    Image.fromarray(np.zeros((9400, 9400), dtype=np.uint16)).save(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size < 1_000_000
    out = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT), path=str(tmp_path / "big.png"))],
                         capture_output=True, text=True, check=True)
    # MiB the decoding added to the peak (the interpreter and its imports vary by machine): the
    # decoded file and one whole-factor reduction of it, nowhere near a float copy of it.
    assert int(out.stdout) < 450


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "photo.jpg")
    with Image.open(tmp_path / "photo.jpg") as image:
        assert shrink(image, (64, 64)).size[0] <= 1000  # decoded at 1/4 or less: never 4000 wide in memory
    array, _ = decode(tmp_path / "photo.jpg", (64, 64))
    assert abs(int(array[..., 1].mean()) - 200) < 3


def _write_cache(tmp_path, name="cache", seed=0):
    root = make_image_folder(tmp_path / f"data-{name}", {"a": 5, "b": 5}, size=(8, 8), seed=seed)
    prepare(scan_folder(root), tmp_path / name, config())
    return tmp_path / name


@pytest.mark.parametrize("damage", ["manifest_of_another_run", "truncated_images", "bad_info", "missing_info"])
def test_a_damaged_or_mixed_cache_is_refused(tmp_path, damage):
    cache = _write_cache(tmp_path)
    if damage == "manifest_of_another_run":  # what two prepares sharing a staging folder used to leave
        other = _write_cache(tmp_path, "other", seed=1)
        (cache / "manifest.csv").write_bytes((other / "manifest.csv").read_bytes())
        message = "manifest.csv is not the one prepared.json describes"
    elif damage == "truncated_images":
        with open(cache / "images.npy", "r+b") as f:
            f.truncate(200)
        message = "is damaged"
    elif damage == "bad_info":
        (cache / "prepared.json").write_text("{")
        message = "is damaged (JSONDecodeError"
    else:
        (cache / "prepared.json").unlink()
        message = "prepared data is missing"
    with pytest.raises(MixerError, match=re.escape(message)):
        open_prepared(cache)
