"""Model directories and weight import: nothing unpickled, every malformed file refused clearly."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mixer.checkpoint import load_model, save_model
from mixer.pretrained import import_weights
from mixer.errors import MixerError
from mixer.model import create_model
from mixer.preprocess import Preprocessing
from reference import as_flax, as_timm, mixer_forward, random_weights

# image (16, 20), patch (4, 5): a 4×4 grid, so the image shape can be inferred from the weights
SHAPE = dict(channels=3, patch=(4, 5), num_patches=16, dim=12, ds=6, dc=24, depth=2, classes=5)


@pytest.fixture
def weights():
    return random_weights(**SHAPE)


def test_save_and_load_round_trip(tmp_path):
    model = create_model(image_shape=(12, 12), patch_shape=(3, 3), depth=2, dim=16, num_classes=3)
    model.class_names, model.preprocessing = ["a", "b", "c"], Preprocessing("center_crop", (0.4, 0.5, 0.6), (0.2,) * 3)
    with torch.no_grad():
        model.head.weight.normal_()
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["class_names"] == ["a", "b", "c"] and meta["architecture"]["image_shape"] == [12, 12]
    assert meta["preprocessing"] == {"resize": "center_crop", "mean": [0.4, 0.5, 0.6], "std": [0.2] * 3}
    loaded = load_model(tmp_path / "m")
    assert not loaded.training
    assert loaded.class_names == ["a", "b", "c"] and loaded.preprocessing == model.preprocessing
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_a_version_1_directory_still_loads(tmp_path):
    """Written before the preprocessing record: normalization and resize at the top level."""
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=2)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["preprocessing"], meta["version"]
    meta.update(normalization={"mean": [0.1] * 3, "std": [0.3] * 3}, resize="center_crop", image_shape=[8, 8])
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path).preprocessing == Preprocessing("center_crop", (0.1,) * 3, (0.3,) * 3)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_import_timm_layout_matches_the_reference(tmp_path, weights, suffix):
    state = as_timm(weights)
    source = tmp_path / f"timm{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for (k, v) in state.items()}, str(source))
    else:
        torch.save(state, source)
    model = import_weights(source, tmp_path / "out")
    assert model.config.image_shape == (16, 20) and model.config.gelu == "exact"
    x = torch.randn(3, 3, 16, 20)
    expected = mixer_forward(x, weights, (4, 5), "exact")
    assert (load_model(tmp_path / "out")(x) - expected).abs().max().item() <= 2e-5


def test_import_vit_jax_npz_matches_the_reference_with_tanh_gelu(tmp_path, weights):
    np.savez(tmp_path / "mixer.npz", **as_flax(weights))
    import_weights(tmp_path / "mixer.npz", tmp_path / "out")
    model = load_model(tmp_path / "out")
    assert model.config.gelu == "tanh"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architecture"]["gelu"] == "tanh"
    x = torch.randn(3, 3, 16, 20)
    assert (model(x) - mixer_forward(x, weights, (4, 5), "tanh")).abs().max().item() <= 2e-5
    # and the exact GELU would not match: the form matters
    assert (model(x) - mixer_forward(x, weights, (4, 5), "exact")).abs().max().item() > 2e-5


def test_non_square_grid_needs_the_image_shape(tmp_path):
    w = random_weights(3, (2, 2), 6, 8, 4, 16, 1, 3)
    torch.save(as_timm(w), tmp_path / "w.pth")
    with pytest.raises(MixerError, match="6 patches is not a square grid"):
        import_weights(tmp_path / "w.pth", tmp_path / "out")
    model = import_weights(tmp_path / "w.pth", tmp_path / "out", image_shape=(4, 6))
    assert model.config.grid == (2, 3)


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(MixerError, match="refusing to unpickle"):
        import_weights(tmp_path / "evil.pth", tmp_path / "out")


MALFORMED = {
    "missing": "missing head.bias", "extra": "unexpected extra.weight",
    "shape": "wrong shape head.weight (4, 8) != (3, 8)", "garbage": "not a readable weights file",
    "not_model": "not an MLP-Mixer config", "no_config": "config.json is missing", "bad_json": "is not valid JSON",
    "float_depth": "depth must be an integer, got 1.0",
    "few_names": "2 class names (2 distinct) for a model with 3 classes",
    "no_names": "class names must be a list of strings, got 'abc'",
    "zero_std": "normalization std must be positive, got [0.5, 0.0, 0.5]",
    "nan_weights": "holds NaN or infinite weights (head.weight): the training that wrote it diverged",
    "tensor_file": "is not a state dict of tensors", "not_utf8": "is not valid JSON",
    "weights_dir": "model.safetensors is a folder, not a weights file",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_model_refuses_malformed_directories(tmp_path, case):
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=3)
    save_model(model, tmp_path)
    state = {k: v.clone() for (k, v) in model.state_dict().items()}
    weights = tmp_path / "model.safetensors"
    meta = json.loads((tmp_path / "config.json").read_text())
    expected = MALFORMED[case]
    if case == "missing":
        del state["head.bias"]
        save_file(state, str(weights))
    elif case == "extra":
        state["extra.weight"] = torch.zeros(2)
        save_file(state, str(weights))
    elif case == "shape":
        state["head.weight"] = torch.zeros(4, 8)
        save_file(state, str(weights))
    elif case == "garbage":
        weights.write_bytes(b"\x00\x01 this is not safetensors")
    elif case == "not_model":
        (tmp_path / "config.json").write_text('{"format": "something-else"}')
    elif case == "no_config":
        (tmp_path / "config.json").unlink()
    elif case == "bad_json":
        (tmp_path / "config.json").write_text("{")
    elif case == "not_utf8":
        (tmp_path / "config.json").write_text(json.dumps(meta), encoding="utf-16")
    elif case in ("float_depth", "few_names", "no_names", "zero_std"):
        if case == "float_depth":
            meta["architecture"]["depth"] = 1.0
        elif case == "few_names":
            meta["class_names"] = ["a", "b"]
        elif case == "no_names":
            meta["class_names"] = "abc"
        else:
            meta["preprocessing"]["std"] = [0.5, 0.0, 0.5]
        (tmp_path / "config.json").write_text(json.dumps(meta))
    elif case == "nan_weights":
        state["head.weight"][0, 0] = float("nan")
        save_file(state, str(weights))
    elif case == "tensor_file":
        weights.unlink()
        torch.save(torch.zeros(3), tmp_path / "model.pth")
        weights = tmp_path / "model.pth"
        with pytest.raises(MixerError) as caught:
            import_weights(weights, tmp_path / "out")
        assert expected in str(caught.value)
        return
    elif case == "weights_dir":
        weights.unlink()
        weights.mkdir()
    with pytest.raises(MixerError) as caught:
        load_model(tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_import_refuses_unknown_layouts(tmp_path):
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(MixerError, match="neither a timm MlpMixer nor a vit_jax"):
        import_weights(tmp_path / "resnet.safetensors", tmp_path / "out")
    with pytest.raises(MixerError, match="does not exist"):
        import_weights(tmp_path / "nothing.npz", tmp_path / "out")
    with pytest.raises(MixerError, match="is a folder, not a weights file"):
        import_weights(tmp_path, tmp_path / "out")
    save_file({"stem.proj.weight": torch.zeros(4, 3), "head.weight": torch.zeros(2, 4)}, str(tmp_path / "flat.safetensors"))
    with pytest.raises(MixerError, match="not an MLP-Mixer checkpoint"):
        import_weights(tmp_path / "flat.safetensors", tmp_path / "out")
    save_file({k: v.contiguous() for (k, v) in as_timm(random_weights(**SHAPE)).items()} | {
        "stem.proj.weight": torch.zeros(12, 3, 4)}, str(tmp_path / "rank.safetensors"))
    with pytest.raises(MixerError, match="stem.weight has 3 dimensions, not 4"):
        import_weights(tmp_path / "rank.safetensors", tmp_path / "out")


def test_imported_directory_records_where_the_weights_came_from(tmp_path, weights):
    import hashlib

    save_file({k: v.contiguous() for (k, v) in as_timm(weights).items()}, str(tmp_path / "timm.safetensors"))
    import_weights(tmp_path / "timm.safetensors", tmp_path / "out")
    source = json.loads((tmp_path / "out" / "config.json").read_text())["source"]
    assert source == {"path": str(tmp_path / "timm.safetensors"),
                      "sha256": hashlib.sha256((tmp_path / "timm.safetensors").read_bytes()).hexdigest()}


# ---- found by mutation testing (mutmut): each of these was a change no test noticed ---------------

def test_a_version_1_directory_without_a_normalization_record_takes_the_papers(tmp_path):
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=2)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["preprocessing"], meta["version"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert load_model(tmp_path).preprocessing == Preprocessing("stretch", (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_common_wrappers_around_a_state_dict_are_opened(tmp_path, weights, wrapper):
    torch.save({wrapper: as_timm(weights), "epoch": torch.tensor(3)}, tmp_path / "w.pth")
    model = import_weights(tmp_path / "w.pth", tmp_path / "out")
    x = torch.randn(2, 3, 16, 20)
    assert (model.eval()(x) - mixer_forward(x, weights, (4, 5), "exact")).abs().max().item() <= 2e-5


@pytest.mark.parametrize("prefix", ["", "/", "params/"])
def test_vit_jax_keys_with_or_without_the_params_prefix(tmp_path, weights, prefix):
    np.savez(tmp_path / "m.npz", **{prefix + k: v for (k, v) in as_flax(weights).items()})
    model = import_weights(tmp_path / "m.npz", tmp_path / "out")
    x = torch.randn(2, 3, 16, 20)
    assert model.config.gelu == "tanh"
    assert (model.eval()(x) - mixer_forward(x, weights, (4, 5), "tanh")).abs().max().item() <= 2e-5


def test_a_state_dict_in_this_projects_names_imports_with_exact_gelu(tmp_path):
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=3)
    torch.nn.init.normal_(model.head.weight)
    save_file({k: v.contiguous() for (k, v) in model.state_dict().items()}, str(tmp_path / "ours.safetensors"))
    imported = import_weights(tmp_path / "ours.safetensors", tmp_path / "out")
    assert imported.config.gelu == "exact"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(imported.eval()(x), model.eval()(x))


def test_load_state_names_every_kind_of_problem_and_counts_the_rest(tmp_path):
    from mixer.checkpoint import load_state

    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=3)
    state = {k: v for (k, v) in model.state_dict().items() if not k.startswith("blocks.0.")}
    state["head.weight"], state["extra"] = torch.zeros(4, 8), torch.zeros(1)
    missing = sorted(k for k in model.state_dict() if k.startswith("blocks.0."))
    with pytest.raises(MixerError) as caught:
        load_state(model, state, "src.pth")
    assert str(caught.value) == (f"src.pth does not fit the model: missing {', '.join(missing[:3])} and "
                                 f"{len(missing) - 3} more; unexpected extra; wrong shape head.weight (4, 8) != (3, 8)")


def test_model_directory_problems_name_the_directory(tmp_path):
    from mixer.checkpoint import read_config

    with pytest.raises(MixerError, match=f"^model directory {tmp_path / 'none'} does not exist$"):
        read_config(tmp_path / "none")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MixerError, match=f"^model directory {tmp_path / 'file'} is not a folder$"):
        read_config(tmp_path / "file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text('{"format": "mlp-mixer"}')  # no architecture
    with pytest.raises(MixerError, match="is not an MLP-Mixer config"):
        read_config(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text('{"format": "other", "architecture": {}}')
    with pytest.raises(MixerError, match="is not an MLP-Mixer config"):
        read_config(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text('{"a": ')
    with pytest.raises(MixerError, match=r"config.json is not valid JSON \(Expecting value: line 1"):
        read_config(tmp_path / "d")
    from mixer.checkpoint import read_tensors

    (tmp_path / "w.safetensors").write_bytes(b"garbage")
    with pytest.raises(MixerError, match="w.safetensors is not a readable weights file \\(.+\\)"):
        read_tensors(tmp_path / "w.safetensors")


def test_saved_files_are_what_other_tools_expect(tmp_path):
    from safetensors import safe_open

    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=2)
    model.class_names = ["猫", "犬"]
    save_model(model, tmp_path / "a" / "b")  # missing parents are created
    with safe_open(str(tmp_path / "a" / "b" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # what transformers/timm check before loading
    text = (tmp_path / "a" / "b" / "config.json").read_text(encoding="utf-8")
    assert '"猫"' in text and text.startswith('{\n  "format"') and text.endswith("}\n")  # readable in a diff
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["config.json", "model.safetensors"]


def test_an_npz_with_pickled_objects_is_refused(tmp_path, weights):
    arrays = as_flax(weights)
    arrays["head/kernel"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "evil.npz", **arrays)
    with pytest.raises(MixerError, match="evil.npz is not a readable weights file \\(Object arrays cannot be loaded"):
        import_weights(tmp_path / "evil.npz", tmp_path / "out")


def test_a_tensor_a_layout_does_not_have_is_named(tmp_path, weights):
    save_file({**as_timm(weights), "pre_logits.weight": torch.zeros(2)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(MixerError, match="t.safetensors: unexpected tensor 'pre_logits.weight' for this layout"):
        import_weights(tmp_path / "t.safetensors", tmp_path / "out")


@pytest.mark.parametrize(("key", "name"), [("blocks.0.mlp_tokens.fc1.weight", "blocks.0.token_mlp.fc1.weight"),
                                           ("blocks.0.mlp_channels.fc1.weight", "blocks.0.channel_mlp.fc1.weight"),
                                           ("head.weight", "head.weight")])
def test_each_tensor_the_architecture_is_read_from_must_have_its_rank(tmp_path, weights, key, name):
    state = {k: v.contiguous() for (k, v) in as_timm(weights).items()}
    state[key] = state[key].flatten().contiguous()
    save_file(state, str(tmp_path / "r.safetensors"))
    with pytest.raises(MixerError, match=f"not an MLP-Mixer checkpoint: {name} has 1 dimensions, not 2"):
        import_weights(tmp_path / "r.safetensors", tmp_path / "out")
