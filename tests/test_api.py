"""The package's public API, as docs/python-api.md shows it: its example runs as written."""

from __future__ import annotations

import re

import torch

import mixer
from conftest import ROOT, make_image_folder
from mixer.checkpoint import save_model


def readme_example() -> str:
    text = (ROOT / "docs" / "python-api.md").read_text()
    return re.search(r"## Example\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained = mixer.create_model(image_shape=(12, 12), patch_shape=(3, 3), depth=1, dim=16, num_classes=3)
    torch.nn.init.normal_(trained.head.weight)  # a head that prefers some classes
    trained.class_names = ["ant", "bee", "cat"]
    save_model(trained, tmp_path / "output")
    make_image_folder(tmp_path / "photos", {"a": 2, "b": 2}, size=(20, 16))
    namespace: dict = {}
    exec(readme_example(), namespace)
    table = namespace["table"]
    assert list(table["path"]) == [f"photos/{c}/img{i:03d}.png" for c in "ab" for i in range(2)]
    assert set(table["label_1"]) <= {"ant", "bee", "cat"} and (table["error"] == "").all()
    assert all(a >= b >= c for (a, b, c) in zip(table["prob_1"], table["prob_2"], table["prob_3"]))
    s16 = 18_528_264 - (512 + 1) * 1000 + (512 + 1) * 120  # timm's S/16 count with a 120-class head
    assert f"{s16:,} parameters" in capsys.readouterr().out


def test_load_model_reads_what_save_model_wrote_and_says_where_from(tmp_path):
    model = mixer.create_model(image_shape=(8, 8), patch_shape=(4, 4), depth=1, dim=8, num_classes=2)
    torch.nn.init.normal_(model.head.weight)
    save_model(model, tmp_path / "m")
    loaded = mixer.load_model(tmp_path / "m")
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert not loaded.training and loaded.source["path"] == str(tmp_path / "m")
