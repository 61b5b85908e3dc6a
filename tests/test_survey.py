"""`mixer check` describes the data before anything is decoded: images per class, the sizes and modes of a
sample of headers, and a note when image_shape is far from the images' size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from mixer.sources import scan_folder
from mixer.survey import survey


def folder(root, classes: dict[str, int], size, mode="L"):
    for (name, n) in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            shape = (size[0], size[1]) if mode == "L" else (size[0], size[1], 3)
            Image.fromarray(np.full(shape, i % 256, np.uint8), mode=mode).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(("size", "image_shape", "note"), [
    ((28, 28), (12, 12), "note: image_shape [12, 12] shrinks these images about 2.3× per side"),
    ((28, 28), (28, 28), None),
    ((20, 30), (12, 16), None),                 # within 2× per side
    ((300, 400), (12, 12), "shrinks these images about 33.3× per side"),
    ((8, 8), (32, 32), "note: image_shape [32, 32] enlarges these images about 4.0× per side"),
], ids=["grey28", "own-size", "near", "photos", "tiny"])
def test_the_data_is_described_and_a_far_resize_is_said(tmp_path, size, image_shape, note):
    source = scan_folder(folder(tmp_path / "d", {"a": 3, "b": 5, "c": 4}, size))
    lines = survey(source).lines(image_shape)
    assert lines[0] == (f"data: 3 classes, 12 images (3 to 5 per class, median 4); a sample of 12: typically "
                        f"{size[0]}×{size[1]} (heights {size[0]} to {size[0]}, widths {size[1]} to {size[1]}), "
                        "modes L 12")
    if note is None:
        assert len(lines) == 1
    else:
        assert len(lines) == 2 and note in lines[1]


def test_the_sample_is_bounded_and_spread_over_the_classes(tmp_path):
    source = scan_folder(folder(tmp_path / "d", {"a": 150, "b": 150}, (4, 4), mode="RGB"))
    s = survey(source, sample=20)
    assert len(s.sizes) == 20 and s.modes == {"RGB": 20}
    opened = []
    survey(source, opener=lambda rel: opened.append(rel) or open(source.root / rel, "rb"), sample=20)
    assert {rel.split("/")[0] for rel in opened} == {"a", "b"}


def test_an_unreadable_header_is_counted_not_raised(tmp_path):
    source = scan_folder(folder(tmp_path / "d", {"a": 2, "b": 2}, (4, 4)))
    (tmp_path / "d" / "a" / "0.png").write_bytes(b"not a png")
    s = survey(source)
    assert (s.unreadable, len(s.sizes)) == (1, 3)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "presets").glob("*.yaml")))
def test_every_preset_the_advice_names_loads(preset):
    from pipeline.params import load_params

    p = load_params(ROOT / "presets" / preset)
    assert p.image_shape[0] % p.patch_shape[0] == 0 or p.variant is not None


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "zip"])
def test_check_describes_a_folder_or_an_archive_before_any_decoding(tmp_path, monkeypatch, packed):
    import shutil

    from typer.testing import CliRunner

    from conftest import write_params
    from pipeline.cli import app

    data = folder(tmp_path / "grey", {"a": 10, "b": 10}, (28, 28))
    if packed:
        data = Path(shutil.make_archive(str(tmp_path / "grey"), "zip", tmp_path, "grey"))
    write_params(tmp_path / "params.yaml", data=str(data))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == 0, result.output
    assert ("data: 2 classes, 20 images (10 to 10 per class, median 10); a sample of 20: typically 28×28 (heights 28 "
            "to 28, widths 28 to 28), modes L 20") in result.output
    assert "note: image_shape [16, 16] shrinks these images about 1.8" not in result.output  # within 2×
    result = CliRunner().invoke(app, ["check", "--image-shape", "8", "8", "--patch-shape", "4", "4"])
    assert "note: image_shape [8, 8] shrinks these images about 3.5× per side" in result.output
    assert "presets/small-grey.yaml" in result.output
