"""Fine-tuning at a whole multiple of a checkpoint's resolution (the paper, Appendix C): the expanded
token-mixing weights make the model, before any training, the mean of the original over the images
its patch groups form."""

from __future__ import annotations

import json

import pytest
import torch

from mixer.errors import MixerError
from mixer.model import at_image_shape, create_model, grid_multiple
from reference import mixer_forward
from test_pretrained import hub, mixer, timm_weights  # noqa: F401 (hub is a fixture)

CASES = [  # (the checkpoint's grid, the multiple per side)
    ((2, 2), (2, 2)),
    ((2, 2), (3, 3)),
    ((2, 3), (2, 2)),  # a grid that is not square
    ((3, 2), (1, 2)),  # a multiple on one side only
    ((2, 3), (3, 1)),
]


def random_model(grid: tuple[int, int], patch: tuple[int, int] = (3, 2), seed: int = 0):
    """A Mixer whose every weight, the head's included, is drawn: a zero head or unit norms would hide errors."""
    torch.manual_seed(seed)
    model = create_model(image_shape=(grid[0] * patch[0], grid[1] * patch[1]), patch_shape=patch, depth=2, dim=8,
                         num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def sub_images(images: torch.Tensor, grid, patch, multiple, tiles: bool = False) -> list[torch.Tensor]:
    """The images the groups form, patch by patch: group (i, j) takes the patch at big row i + Kh·r and big
    column j + Kw·c to its row r, column c (`tiles`: the contiguous tile (i, j) instead, a wrong grouping)."""
    (gh, gw), (ph, pw), (kh, kw) = grid, patch, multiple
    out = []
    for i in range(kh):
        for j in range(kw):
            sub = images.new_empty(images.shape[0], images.shape[1], gh * ph, gw * pw)
            for r in range(gh):
                for c in range(gw):
                    (R, C) = (i * gh + r, j * gw + c) if tiles else (i + kh * r, j + kw * c)
                    sub[:, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = \
                        images[:, :, R * ph:(R + 1) * ph, C * pw:(C + 1) * pw]
            out.append(sub)
    return out


def pre_logits(model, images):
    with torch.inference_mode():
        return model.forward_head(model.forward_features(images), pre_logits=True)


@pytest.mark.parametrize(("grid", "multiple"), CASES)
def test_expanded_features_are_the_mean_of_the_originals_over_the_groups_images(grid, multiple):
    patch = (3, 2)
    model = random_model(grid, patch)
    (height, width) = model.config.image_shape
    big = at_image_shape(model, (height * multiple[0], width * multiple[1]))
    images = torch.randn(3, 3, *big.config.image_shape, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([pre_logits(model, s) for s in sub_images(images, grid, patch, multiple)]).mean(0)
    assert (pre_logits(big, images) - expected).abs().max() < 1e-5
    # the check tells groupings apart: contiguous tiles give other features (unless there is one group per row)
    if multiple[0] > 1 and grid[0] > 1 or multiple[1] > 1 and grid[1] > 1:
        tiles = torch.stack([pre_logits(model, s) for s in sub_images(images, grid, patch, multiple, True)]).mean(0)
        assert (pre_logits(big, images) - tiles).abs().max() > 1e-2


@pytest.mark.parametrize(("grid", "multiple"), CASES)
def test_each_token_mixing_layer_is_block_diagonal_with_copies_of_the_original(grid, multiple):
    model = random_model(grid)
    (height, width) = model.config.image_shape
    big = at_image_shape(model, (height * multiple[0], width * multiple[1]))
    copies = multiple[0] * multiple[1]
    assert big.config.token_hidden == copies * model.config.token_hidden
    assert big.config.num_patches == copies * model.config.num_patches
    (gh, gw), (kh, kw), hidden = model.config.grid, multiple, model.config.token_hidden
    for (old, new) in zip(model.blocks, big.blocks):
        (w1, b1, w2, b2) = (old.token_mlp.fc1.weight, old.token_mlp.fc1.bias, old.token_mlp.fc2.weight,
                            old.token_mlp.fc2.bias)
        expected_w1, expected_w2 = torch.zeros_like(new.token_mlp.fc1.weight), torch.zeros_like(new.token_mlp.fc2.weight)
        expected_b2 = torch.empty_like(new.token_mlp.fc2.bias)
        for R in range(gh * kh):  # the big patch (R, C) is patch (R // Kh, C // Kw) of group (R % Kh, C % Kw)
            for C in range(gw * kw):
                (token, group, local) = (R * gw * kw + C, (R % kh) * kw + C % kw, (R // kh) * gw + C // kw)
                rows = slice(group * hidden, (group + 1) * hidden)
                expected_w1[rows, token], expected_w2[token, rows] = w1[:, local], w2[local]
                expected_b2[token] = b2[local]  # invisible in the outputs (LayerNorm removes it): checked here
        assert torch.equal(new.token_mlp.fc1.weight, expected_w1) and torch.equal(new.token_mlp.fc2.weight, expected_w2)
        assert torch.equal(new.token_mlp.fc1.bias, b1.repeat(copies)) and torch.equal(new.token_mlp.fc2.bias, expected_b2)
        assert torch.equal(new.channel_mlp.fc1.weight, old.channel_mlp.fc1.weight)  # per patch: kept
    assert torch.equal(big.stem.weight, model.stem.weight) and torch.equal(big.head.weight, model.head.weight)


def test_at_its_own_size_the_model_is_returned_as_it_is():
    model = random_model((2, 3))
    assert at_image_shape(model, model.config.image_shape) is model


@pytest.mark.parametrize("shape", [(3, 3), (9, 6), (18, 7), (7, 12), (18, 9), (12, 8)])
def test_a_size_that_is_not_a_whole_multiple_names_those_that_work(shape):
    config = random_model((2, 3)).config  # 6x6 images in 3x2 patches
    with pytest.raises(MixerError) as error:
        grid_multiple(config, shape)
    assert str(error.value) == (f"image_shape {list(shape)} does not fit weights whose token mixing is tied to a "
                                "2x3 grid of 3x2 patches: give their own [6, 6] or a whole multiple per side, e.g. "
                                "[12, 12] (fine-tuning at a higher resolution)")


def test_a_hub_model_keeps_its_logits_at_its_size_and_averages_its_groups_at_twice_it(hub, tmp_path):
    """Against the reference forward of the hub's weights (tests/reference.py), not this project's model;
    through `mixer import-weights` in a process of its own (huggingface_hub reads HF_HOME once, at import)."""
    from mixer.checkpoint import load_model

    for (name, shape) in (("own", ("16", "20")), ("big", ("32", "40"))):
        done = mixer(["import-weights", "hf-hub:someone/mixer-tiny", name, "--image-shape", *shape], tmp_path,
                     HF_HOME=str(hub))
        assert done.returncode == 0, done.stderr
    (own, big) = (load_model(tmp_path / "own").eval(), load_model(tmp_path / "big").eval())
    weights = timm_weights(0)  # 16x20 images in 4x4 patches: a 4x5 grid
    x = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (own(x) - mixer_forward(x, weights, (4, 4), "exact")).abs().max() < 2e-5
    assert big.meta["source"] == own.meta["source"] and big.preprocessing == own.preprocessing
    images = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    expected = torch.stack([mixer_forward(s, weights, (4, 4), "exact")
                            for s in sub_images(images, (4, 5), (4, 4), (2, 2))]).mean(0)
    with torch.inference_mode():  # the head is linear: the logits average as the features do
        assert (big(images) - expected).abs().max() < 2e-5


def test_import_weights_at_a_multiple_and_a_size_that_does_not_fit(hub, tmp_path):
    done = mixer(["import-weights", "hf-hub:someone/mixer-tiny", "big", "--image-shape", "32", "60"], tmp_path,
                 HF_HOME=str(hub))
    assert done.returncode == 0, done.stderr
    architecture = json.loads((tmp_path / "big" / "config.json").read_text())["architecture"]
    assert (architecture["image_shape"], architecture["token_hidden"]) == ([32, 60], 8 * 6)
    refused = mixer(["import-weights", "hf-hub:someone/mixer-tiny", "odd", "--image-shape", "24", "30"], tmp_path,
                    HF_HOME=str(hub))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("error: hf-hub:someone/mixer-tiny: image_shape [24, 30] does not fit")
    assert "give their own [16, 20] or a whole multiple per side" in refused.stderr
    assert not (tmp_path / "odd").exists()
