"""The model is the paper's: parameter counts from the formula, forward pass against the equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mixer.errors import MixerError
from mixer.model import VARIANTS, create_model
from reference import from_model, mixer_forward

# timm's exact counts for these variants at 224x224 and 1,000 classes (the paper rounds to millions:
# 19M, 18M, 60M, 59M, 206M, 207M, 431M), e.g. `sum(p.numel() for p in timm.create_model("mixer_b16_224").parameters())`.
TIMM_COUNTS = {"S/32": 19_104_624, "S/16": 18_528_264, "B/32": 60_293_428, "B/16": 59_880_472,
                "L/32": 206_939_264, "L/16": 208_196_168, "H/14": 432_350_952}


def formula_count(image, patch, depth, dim, ds, dc, classes, chans=3) -> int:
    """Parameters of an MLP-Mixer, from the architecture alone."""
    s = (image[0] // patch[0]) * (image[1] // patch[1])
    stem = dim * chans * patch[0] * patch[1] + dim
    block = 2 * (2 * dim) + (s * ds + ds + ds * s + s) + (dim * dc + dc + dc * dim + dim)
    return stem + depth * block + 2 * dim + dim * classes + classes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_paper_variants_have_timms_exact_parameter_counts(variant):
    patch, depth, dim, ds, dc = VARIANTS[variant]
    expected = formula_count((224, 224), (patch, patch), depth, dim, ds, dc, 1000)
    assert expected == TIMM_COUNTS[variant]
    with torch.device("meta"):  # no memory for H/14's 432M parameters
        model = create_model(variant, image_shape=(224, 224), num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize(("image", "patch", "depth", "dim"), [((12, 12), (3, 3), 4, 128), ((32, 48), (8, 4), 3, 64),
                                                             ((256, 256), (16, 16), 6, 512)])
def test_default_widths_follow_the_paper_and_counts_match(image, patch, depth, dim):
    model = create_model(image_shape=image, patch_shape=patch, depth=depth, dim=dim, num_classes=120)
    assert model.blocks[0].token_mlp.fc1.out_features == dim // 2  # D_S = C/2, not 4·S
    assert model.blocks[0].channel_mlp.fc1.out_features == 4 * dim
    assert sum(p.numel() for p in model.parameters()) == formula_count(image, patch, depth, dim, dim // 2, 4 * dim, 120)


def test_blocks_are_not_shared():
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=3, dim=16, num_classes=4)
    pointers = {b.channel_mlp.fc1.weight.data_ptr() for b in model.blocks}
    assert len(pointers) == 3
    assert not torch.equal(model.blocks[0].channel_mlp.fc1.weight, model.blocks[1].channel_mlp.fc1.weight)


def test_variant_fields_and_explicit_overrides():
    model = create_model("B/16", image_shape=(224, 224), num_classes=10)
    c = model.config
    assert (c.patch_shape, c.depth, c.dim, c.token_hidden, c.channel_hidden) == ((16, 16), 12, 768, 384, 3072)
    c = create_model("B/16", image_shape=(224, 224), num_classes=10, depth=2, dim=64).config
    assert (c.depth, c.dim, c.token_hidden, c.channel_hidden) == (2, 64, 32, 256)
    with pytest.raises(MixerError, match="unknown variant 'Q/9'"):
        create_model("Q/9")
    with pytest.raises(MixerError, match="not divisible by patch_shape"):
        create_model("S/32", image_shape=(100, 100))


@pytest.mark.parametrize("form", ["exact", "tanh"])
@pytest.mark.parametrize(("image", "patch"), [((12, 12), (3, 3)), ((16, 24), (4, 2))])
def test_forward_matches_the_papers_equations(form, image, patch):
    torch.manual_seed(0)
    model = create_model(image_shape=image, patch_shape=patch, depth=2, dim=24, num_classes=5, gelu=form)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a nonzero head and biases, so every term counts
    x = torch.randn(3, 3, *image)
    expected = mixer_forward(x, from_model(model), patch, form)
    assert model(x).shape == (3, 5)
    torch.testing.assert_close(model(x), expected, atol=2e-5, rtol=1e-4)


def test_forward_features_and_head_split():
    model = create_model(image_shape=(16, 24), patch_shape=(4, 4), depth=1, dim=8, num_classes=3)
    x = torch.randn(2, 3, 16, 24)
    features = model.forward_features(x)
    assert features.shape == (2, 24, 8)
    assert model.forward_head(features, pre_logits=True).shape == (2, 8)
    torch.testing.assert_close(model.forward_head(features), model(x))


def test_initialisation_zero_head_first_loss_is_log_classes():
    torch.manual_seed(0)
    model = create_model(image_shape=(32, 32), patch_shape=(4, 4), depth=2, dim=64, num_classes=7)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(math.log(7), abs=1e-6)
    # LeCun normal: weight variance 1/fan_in (within sampling error), biases zero
    w = model.blocks[0].channel_mlp.fc1.weight
    assert w.var().item() == pytest.approx(1 / 64, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].channel_mlp.fc1.bias) == 0


def test_dropout_and_drop_path_are_off_by_default_and_work_when_on():
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=2, dim=16, num_classes=3).train()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), model(x))
    noisy = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=2, dim=16, num_classes=3,
                         dropout=0.5, drop_path=0.5).train()
    with torch.no_grad():
        noisy.head.weight.normal_()
    assert not torch.allclose(noisy(x), noisy(x))
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy(x))


def test_token_mixing_without_transposes_equals_the_transposed_form():
    model = create_model(image_shape=(12, 12), patch_shape=(3, 3), depth=1, dim=10, num_classes=3)
    mlp = model.blocks[0].token_mlp
    x = torch.randn(4, 16, 10)  # (batch, tokens, dim), the usual layout
    token_major = mlp.forward_tokens(x.transpose(0, 1).contiguous()).transpose(0, 1)
    torch.testing.assert_close(token_major, mlp(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize(("image", "patch"), [((12, 12), (3, 3)), ((16, 24), (4, 2))])
def test_patch_embedding_equals_the_strided_conv(image, patch):
    model = create_model(image_shape=image, patch_shape=patch, depth=1, dim=10, num_classes=3)
    x = torch.randn(2, 3, *image)
    conv = model.stem(x).flatten(2).permute(2, 0, 1)  # (patches, batch, dim)
    torch.testing.assert_close(model.embed(x), conv, atol=1e-5, rtol=1e-5)


def test_reset_head_for_fine_tuning():
    model = create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=1, dim=8, num_classes=3)
    model.reset_head([f"c{i}" for i in range(11)])
    assert model.config.num_classes == 11 and model(torch.randn(1, 3, 8, 8)).shape == (1, 11)
    assert model.class_names == [f"c{i}" for i in range(11)]
    assert torch.count_nonzero(model.head.weight) == 0
