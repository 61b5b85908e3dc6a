"""MLP-Mixer (Tolstikhin et al. 2021, arXiv 2105.01601), to the parameter.

Read top to bottom: the MLP, the block, the model, then the paper's variants and `create_model`.
Checkpoint keys follow the paper's names: `stem`, `blocks.N.token_norm`, `blocks.N.token_mlp.fc1`,
`blocks.N.channel_norm`, `blocks.N.channel_mlp.fc1`, `norm`, `head`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mixer.errors import MixerError
from mixer.hparams import at_least, between, check, each, fraction, hp
from mixer.preprocess import Preprocessing

LAYER_NORM_EPS = 1e-6  # both the official vit_jax code and timm use 1e-6, not torch's 1e-5


class Mlp(nn.Module):
    """Two dense layers with a GELU between: the paper's MlpBlock."""

    def __init__(self, dim: int, hidden: int, gelu: str = "exact", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # mixes the last axis
        x = self.drop(F.gelu(self.fc1(x), approximate=self.approximate))
        return self.drop(self.fc2(x))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Mix axis 0 of token-major activations (tokens, batch, dim): W2·GELU(W1·X + b1) + b2.

        X is viewed as one (tokens, batch·dim) matrix, so each layer is a single GEMM with its bias
        fused (addmm): the function of `self(x.transpose(...))` in the usual (batch, tokens, dim)
        layout, without transposes, copies or batched small matmuls. The hidden layer is kept as
        (batch·dim, hidden), i.e. (W1·X)ᵀ: BLAS runs these skinny GEMMs about 1.7× faster in that
        orientation when there are few tokens, and no slower when there are many.
        """
        tokens, rest = x.shape[0], x.shape[1:]
        h = torch.addmm(self.fc1.bias, x.reshape(tokens, -1).t(), self.fc1.weight.t())
        h = self.drop(F.gelu(h, approximate=self.approximate))
        return self.drop(torch.addmm(self.fc2.bias.unsqueeze(1), self.fc2.weight, h.t())).view(tokens, *rest)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: drop the residual branch for whole samples (Huang et al. 2016).

    `x` is token-major (tokens, batch, dim): the batch is axis 1.
    """
    if rate == 0.0 or not training:
        return x
    keep = x.new_empty(1, x.shape[1], 1).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing across features; pre-LayerNorm, skips."""

    def __init__(self, num_patches: int, dim: int, token_hidden: int, channel_hidden: int,
                 gelu: str = "exact", dropout: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.token_mlp = Mlp(num_patches, token_hidden, gelu, dropout)
        self.channel_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.channel_mlp = Mlp(dim, channel_hidden, gelu, dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:  # x: (patches, batch, dim), token-major
        x = x + drop_path(self.token_mlp.forward_tokens(self.token_norm(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.channel_mlp(self.channel_norm(x)), self.drop_path_rate, self.training)


@dataclass(frozen=True)
class MixerConfig:
    """Everything that fixes the architecture; saved as `config.json` beside the weights."""

    image_shape: tuple[int, int] = hp((224, 224), "input height and width", stages="prepare train",
                                      rule=each(between(1, 65536)), original=(256, 256))
    patch_shape: tuple[int, int] = hp((16, 16), "patch height and width", rule=each(between(1, 65536)),
                                      original=(16, 16))
    depth: int = hp(8, "number of Mixer blocks", rule=at_least(1), original=6)
    dim: int = hp(512, "channels C (hidden width of each patch)", rule=at_least(1), original=512)
    token_hidden: int | None = hp(None, "token-mixing hidden width D_S (null: dim/2)", rule=at_least(1))
    channel_hidden: int | None = hp(None, "channel-mixing hidden width D_C (null: 4*dim)", rule=at_least(1))
    num_classes: int = 1000  # from the data: the params key is the prepare stage's expectation
    in_chans: int = 3
    gelu: str = "exact"  # "exact" (timm, PyTorch) or "tanh" (the official JAX code)
    dropout: float = hp(0.0, "dropout inside the MLPs", rule=fraction())
    drop_path: float = hp(0.0, "stochastic depth rate of the last block (0 at the first, linear between)",
                          rule=fraction())

    def __post_init__(self):
        check(self)
        if self.token_hidden is None:  # the paper's ratios
            object.__setattr__(self, "token_hidden", self.dim // 2)
        if self.channel_hidden is None:
            object.__setattr__(self, "channel_hidden", self.dim * 4)
        if self.image_shape[0] % self.patch_shape[0] or self.image_shape[1] % self.patch_shape[1]:
            near = [min((d for d in range(2, 2 * patch + 1) if side % d == 0), key=lambda d: (abs(d - patch), -d),
                        default=None) for (side, patch) in zip(self.image_shape, self.patch_shape)]
            hint = f"; patch_shape {near} divides it" if None not in near else ""
            raise MixerError(f"image_shape {list(self.image_shape)} is not divisible by "
                             f"patch_shape {list(self.patch_shape)}{hint}")
        for name in ("num_classes", "in_chans"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise MixerError(f"{name} must be an integer of at least 1, got {value!r}")
        if self.gelu not in ("exact", "tanh"):
            raise MixerError(f"gelu must be 'exact' or 'tanh', got {self.gelu!r}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_shape[0] // self.patch_shape[0], self.image_shape[1] // self.patch_shape[1])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for (k, v) in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MixerConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MixerError(f"unknown architecture keys {sorted(unknown)}")
        return cls(**d)


class MlpMixer(nn.Module):
    """Patch embedding, `depth` unshared Mixer blocks, LayerNorm, global average pool, linear head.

    Beside the weights it carries what a model directory records with them: the class names its
    outputs stand for and how an image file becomes its input (`preprocessing`).
    """

    def __init__(self, config: MixerConfig, class_names: list[str] | None = None,
                 preprocessing: Preprocessing | None = None):
        super().__init__()
        self.config = config
        self.class_names = check_class_names(class_names, config.num_classes)
        self.preprocessing = preprocessing or Preprocessing()
        self.source: dict | None = None  # where pretrained weights came from (mixer.pretrained), saved with them
        c = config
        # A conv with stride = kernel = patch is the paper's per-patch linear embedding.
        self.stem = nn.Conv2d(c.in_chans, c.dim, kernel_size=c.patch_shape, stride=c.patch_shape)
        # Stochastic depth by the linear decay rule of Huang et al. 2016 (as DeiT): 0 at the first block, drop_path
        # at the last (timm's MlpMixer gives every block the same rate).
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.Sequential(*[
            MixerBlock(c.num_patches, c.dim, c.token_hidden, c.channel_hidden, c.gelu, c.dropout, rates[i])
            for i in range(c.depth)
        ])
        self.norm = nn.LayerNorm(c.dim, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.grad_checkpointing = False  # a machine setting (mixer.engine.Machine), not saved with the weights
        self._init_weights()

    def _init_weights(self) -> None:
        """As the official vit_jax `MlpMixer`: Flax's defaults everywhere, a zero head.

        Flax's Dense and Conv default to LeCun normal kernels (truncated normal, variance
        1/fan_in) and zero biases; LayerNorm starts at scale 1, bias 0.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                # truncated at 2 std; the std is corrected so the variance is exactly 1/fan_in
                std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)  # paper: zero head, so the first loss is log(num_classes)
        nn.init.zeros_(self.head.bias)

    def reset_head(self, class_names: list[str]) -> None:
        """Replace the classifier for fine-tuning on another label set (zero-initialised)."""
        self.head = nn.Linear(self.config.dim, len(class_names)).to(self.head.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.config = replace(self.config, num_classes=len(class_names))
        self.class_names = check_class_names(class_names, len(class_names))

    def embed(self, images: Tensor) -> Tensor:
        """Per-patch linear embedding: (batch, chans, H, W) → token-major (patches, batch, dim).

        The same function as `self.stem` (a conv with stride = kernel = patch), as one reshape and
        one GEMM that lands directly in the layout the blocks use.
        """
        b, c, h, w = images.shape
        (ph, pw), (gh, gw) = self.config.patch_shape, (h // self.config.patch_shape[0], w // self.config.patch_shape[1])
        patches = images.reshape(b, c, gh, ph, gw, pw).permute(2, 4, 0, 1, 3, 5).reshape(gh * gw, b, c * ph * pw)
        return F.linear(patches, self.stem.weight.reshape(self.stem.out_channels, -1), self.stem.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (as timm's): in training, each block keeps only its input and
        recomputes the rest in the backward (about one forward more), so the activations of one block are
        alive at a time instead of all `depth`. The same gradients: the recomputation replays the RNG state
        (dropout, drop path) the forward drew."""
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (batch, chans, H, W) to normalised patch embeddings (batch, patches, dim)."""
        # The blocks run token-major, (patches, batch, dim): both mixings are then plain GEMMs.
        x = self.embed(x)
        if self.grad_checkpointing and self.blocks.training and torch.is_grad_enabled():
            for block in self.blocks:  # frozen (eval-mode) blocks or no_grad: nothing to save, nothing to replay
                x = checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x).transpose(0, 1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool over patches, then the linear head; x: (batch, patches, dim)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def check_class_names(names: list[str] | None, num_classes: int) -> list[str]:
    """The names of a model's outputs: one distinct string per class ('0', '1', ... when not given)."""
    if names is None:
        return [str(i) for i in range(num_classes)]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise MixerError(f"class names must be a list of strings, got {names!r:.80}")
    if len(names) != num_classes or len(set(names)) != len(names):
        raise MixerError(f"{len(names)} class names ({len(set(names))} distinct) for a model with {num_classes} classes")
    return list(names)


# Paper, Table 1: (patch, depth, C, D_S, D_C).
VARIANTS: dict[str, tuple[int, int, int, int, int]] = {
    "S/32": (32, 8, 512, 256, 2048),
    "S/16": (16, 8, 512, 256, 2048),
    "B/32": (32, 12, 768, 384, 3072),
    "B/16": (16, 12, 768, 384, 3072),
    "L/32": (32, 24, 1024, 512, 4096),
    "L/16": (16, 24, 1024, 512, 4096),
    "H/14": (14, 32, 1280, 640, 5120),
}


def variant_fields(variant: str) -> dict:
    """The architecture fields a paper variant fixes."""
    if variant not in VARIANTS:
        raise MixerError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    patch, depth, dim, token_hidden, channel_hidden = VARIANTS[variant]
    return dict(patch_shape=(patch, patch), depth=depth, dim=dim,
                token_hidden=token_hidden, channel_hidden=channel_hidden)


def create_model(variant: str | None = None, **fields_: object) -> MlpMixer:
    """Build a Mixer from a paper variant and/or explicit fields (params.yaml names); fields win.

    Hidden widths left out (or None) follow the paper's ratios: D_S = dim/2, D_C = 4·dim.
    """
    return MlpMixer(variant_config(variant, **fields_))


def variant_config(variant: str | None = None, **fields_: object) -> MixerConfig:
    """The architecture `create_model` builds, without building it (no weights, no random draws)."""
    explicit = {k: v for (k, v) in fields_.items() if v is not None}
    settings: dict = variant_fields(variant) if variant else {}
    if "dim" in explicit:  # a new width re-derives the hidden widths unless they are given too
        settings.pop("token_hidden", None)
        settings.pop("channel_hidden", None)
    settings.update(explicit)
    try:
        return MixerConfig(**settings)
    except TypeError as exc:  # an unknown field name
        raise MixerError(f"create_model: {exc}") from None


# ---- another resolution: the paper's fine-tuning at a higher one (Appendix C) -----------------------

def grid_multiple(config: MixerConfig, image_shape: tuple[int, int]) -> tuple[int, int]:
    """How many times, per side, the patch grid of `image_shape` holds `config`'s: (1, 1) at its own size.

    Any other size is an error naming those that work: the token-mixing weights are tied to the grid,
    and a whole multiple is what `at_image_shape` can expand them to."""
    (height, width), (h, w) = config.image_shape, image_shape
    if h < 1 or w < 1 or h % height or w % width:
        (gh, gw), (ph, pw) = config.grid, config.patch_shape
        raise MixerError(f"image_shape {list(image_shape)} does not fit weights whose token mixing is tied to a "
                         f"{gh}x{gw} grid of {ph}x{pw} patches: give their own [{height}, {width}] or a whole multiple "
                         f"per side, e.g. [{2 * height}, {2 * width}] (fine-tuning at a higher resolution)")
    return (h // height, w // width)


def config_at(config: MixerConfig, image_shape: tuple[int, int]) -> MixerConfig:
    """The architecture `at_image_shape` gives: `image_shape`, and K = Kh·Kw times the token-mixing width."""
    (kh, kw) = grid_multiple(config, image_shape)
    return replace(config, image_shape=tuple(image_shape), token_hidden=config.token_hidden * kh * kw)


def patch_groups(grid: tuple[int, int], multiple: tuple[int, int]) -> Tensor:
    """The grouping of `at_image_shape`: for the (Kh·gh, Kw·gw) grid of patches in raster order, a (Kh·Kw,
    gh·gw) table whose row (i·Kw + j) lists, in raster order, the patches at rows i, i + Kh, i + 2·Kh, ...
    and columns j, j + Kw, ...: every Kh-th row and Kw-th column, from offset (i, j)."""
    (gh, gw), (kh, kw) = grid, multiple
    index = torch.arange(gh * kh * gw * kw).view(gh, kh, gw, kw)  # big row r·Kh + i, column c·Kw + j
    return index.permute(1, 3, 0, 2).reshape(kh * kw, gh * gw)


def at_image_shape(model: MlpMixer, image_shape: tuple[int, int]) -> MlpMixer:
    """`model` for images of `image_shape`, a whole multiple (Kh·H, Kw·W) of its own (H, W); itself at (H, W).

    As the paper fine-tunes at a higher resolution (Appendix C): the K = Kh·Kw times as many patches are
    split into K groups of the original grid's size, and each token-mixing MLP becomes block-diagonal,
    K copies of the original (hidden width K·D_S), so each group is mixed exactly as the original model
    mixed its image; everything else acts per patch and is kept. Before any training, the pooled
    features are the mean of the original model's over the K images the groups form.

    A group is every Kh-th row and Kw-th column of patches (`patch_groups`), not a contiguous tile: each
    group then spans the whole image, so each copy of the token-mixing weights sees the layout it was
    trained on (the patch at relative position (y, x) of the image is still at (y, x) of its group), as
    ViT's interpolated position embeddings keep it; a tile would be a quarter of the scene at twice the
    zoom, an object cut in four.
    """
    if tuple(image_shape) == model.config.image_shape:
        return model
    config = config_at(model.config, image_shape)
    multiple = grid_multiple(model.config, image_shape)
    groups = patch_groups(model.config.grid, multiple).flatten()
    copies = multiple[0] * multiple[1]
    weight = next(model.parameters())
    wider = MlpMixer(config, model.class_names, model.preprocessing).to(weight.device, weight.dtype)
    state = model.state_dict()
    for (name, tensor) in list(state.items()):
        if ".token_mlp." not in name:
            continue
        if name.endswith("fc1.weight"):  # (D_S, S): group g's tokens feed hidden units g·D_S .. (g+1)·D_S
            expanded = torch.empty(tensor.shape[0] * copies, tensor.shape[1] * copies, dtype=tensor.dtype)
            expanded[:, groups] = torch.block_diag(*[tensor] * copies)
        elif name.endswith("fc1.bias"):
            expanded = tensor.repeat(copies)
        elif name.endswith("fc2.weight"):  # (S, D_S)
            expanded = torch.empty(tensor.shape[0] * copies, tensor.shape[1] * copies, dtype=tensor.dtype)
            expanded[groups] = torch.block_diag(*[tensor] * copies)
        else:  # fc2.bias, one per token
            expanded = torch.empty(tensor.shape[0] * copies, dtype=tensor.dtype)
            expanded[groups] = tensor.repeat(copies)
        state[name] = expanded
    wider.load_state_dict(state)
    wider.train(model.training)
    for attribute in ("source", "meta"):  # where the weights came from, as `mixer.pretrained` records it
        if hasattr(model, attribute):
            setattr(wider, attribute, getattr(model, attribute))
    return wider
