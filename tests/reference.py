"""The paper's equations in plain tensor ops, written apart from mixer/model.py on purpose.

This is a second, independent statement of the block (mixer/bench.py's ReferenceMixer is the
third): weights come as a dict in the paper's own terms (no nn.Module), so tests compare the model
and imported checkpoints against a computation that shares no code with them. Keep it separate.
"""

from __future__ import annotations

import math

import torch


def gelu(x: torch.Tensor, form: str) -> torch.Tensor:
    if form == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * scale + bias


def mixer_forward(images: torch.Tensor, w: dict, patch: tuple[int, int], form: str) -> torch.Tensor:
    """Logits from images (B, C, H, W) and weights w in (out, in) form.

    w: stem (D, C, ph, pw), stem_b; blocks: list of dicts ln1_s, ln1_b, t1 (Ds, S), t1_b, t2 (S, Ds),
    t2_b, ln2_s, ln2_b, c1 (Dc, D), c1_b, c2 (D, Dc), c2_b; norm_s, norm_b, head (K, D), head_b.
    """
    B, C, H, W = images.shape
    ph, pw = patch
    gh, gw = H // ph, W // pw
    patches = images.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * ph * pw)
    X = patches @ w["stem"].reshape(w["stem"].shape[0], -1).T + w["stem_b"]           # (B, S, D)
    for blk in w["blocks"]:
        Y = layer_norm(X, blk["ln1_s"], blk["ln1_b"])
        # token mixing: U_{*,i} = X_{*,i} + W2 σ(W1 LayerNorm(X)_{*,i}), columns i = channels
        hidden = torch.einsum("ks,bsc->bkc", blk["t1"], Y) + blk["t1_b"][None, :, None]
        X = X + torch.einsum("sk,bkc->bsc", blk["t2"], gelu(hidden, form)) + blk["t2_b"][None, :, None]
        # channel mixing: Y_{j,*} = U_{j,*} + W4 σ(W3 LayerNorm(U)_{j,*}), rows j = patches
        Z = layer_norm(X, blk["ln2_s"], blk["ln2_b"])
        X = X + gelu(Z @ blk["c1"].T + blk["c1_b"], form) @ blk["c2"].T + blk["c2_b"]
    pooled = layer_norm(X, w["norm_s"], w["norm_b"]).mean(1)
    return pooled @ w["head"].T + w["head_b"]


def random_weights(channels, patch, num_patches, dim, ds, dc, depth, classes, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    return {
        "stem": r(dim, channels, *patch), "stem_b": r(dim),
        "blocks": [{
            "ln1_s": 1 + r(dim), "ln1_b": r(dim), "t1": r(ds, num_patches), "t1_b": r(ds),
            "t2": r(num_patches, ds), "t2_b": r(num_patches), "ln2_s": 1 + r(dim), "ln2_b": r(dim),
            "c1": r(dc, dim), "c1_b": r(dc), "c2": r(dim, dc), "c2_b": r(dim),
        } for _ in range(depth)],
        "norm_s": 1 + r(dim), "norm_b": r(dim), "head": r(classes, dim), "head_b": r(classes),
    }


def as_timm(w: dict) -> dict:
    """The same weights under timm's MlpMixer names."""
    out = {"stem.proj.weight": w["stem"], "stem.proj.bias": w["stem_b"],
           "norm.weight": w["norm_s"], "norm.bias": w["norm_b"], "head.weight": w["head"], "head.bias": w["head_b"]}
    for (i, b) in enumerate(w["blocks"]):
        p = f"blocks.{i}."
        out.update({p + "norm1.weight": b["ln1_s"], p + "norm1.bias": b["ln1_b"],
                    p + "mlp_tokens.fc1.weight": b["t1"], p + "mlp_tokens.fc1.bias": b["t1_b"],
                    p + "mlp_tokens.fc2.weight": b["t2"], p + "mlp_tokens.fc2.bias": b["t2_b"],
                    p + "norm2.weight": b["ln2_s"], p + "norm2.bias": b["ln2_b"],
                    p + "mlp_channels.fc1.weight": b["c1"], p + "mlp_channels.fc1.bias": b["c1_b"],
                    p + "mlp_channels.fc2.weight": b["c2"], p + "mlp_channels.fc2.bias": b["c2_b"]})
    return out


def as_flax(w: dict) -> dict:
    """The same weights as the official vit_jax npz: Dense kernels (in, out), the stem HWIO."""
    out = {"stem/kernel": w["stem"].permute(2, 3, 1, 0), "stem/bias": w["stem_b"],
           "pre_head_layer_norm/scale": w["norm_s"], "pre_head_layer_norm/bias": w["norm_b"],
           "head/kernel": w["head"].T, "head/bias": w["head_b"]}
    for (i, b) in enumerate(w["blocks"]):
        p = f"MixerBlock_{i}/"
        out.update({p + "LayerNorm_0/scale": b["ln1_s"], p + "LayerNorm_0/bias": b["ln1_b"],
                    p + "token_mixing/Dense_0/kernel": b["t1"].T, p + "token_mixing/Dense_0/bias": b["t1_b"],
                    p + "token_mixing/Dense_1/kernel": b["t2"].T, p + "token_mixing/Dense_1/bias": b["t2_b"],
                    p + "LayerNorm_1/scale": b["ln2_s"], p + "LayerNorm_1/bias": b["ln2_b"],
                    p + "channel_mixing/Dense_0/kernel": b["c1"].T, p + "channel_mixing/Dense_0/bias": b["c1_b"],
                    p + "channel_mixing/Dense_1/kernel": b["c2"].T, p + "channel_mixing/Dense_1/bias": b["c2_b"]})
    return {k: v.contiguous().numpy() for (k, v) in out.items()}


def from_model(model) -> dict:
    """Read a model's weights into the reference's terms (to check its forward pass)."""
    return from_state_dict({k: v.detach() for (k, v) in model.state_dict().items()})


def from_state_dict(sd: dict) -> dict:
    """The reference's terms for a state dict's tensors, the same objects (so gradients reach them)."""
    blocks = []
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        p = f"blocks.{i}."
        blocks.append({"ln1_s": sd[p + "token_norm.weight"], "ln1_b": sd[p + "token_norm.bias"],
                       "t1": sd[p + "token_mlp.fc1.weight"], "t1_b": sd[p + "token_mlp.fc1.bias"],
                       "t2": sd[p + "token_mlp.fc2.weight"], "t2_b": sd[p + "token_mlp.fc2.bias"],
                       "ln2_s": sd[p + "channel_norm.weight"], "ln2_b": sd[p + "channel_norm.bias"],
                       "c1": sd[p + "channel_mlp.fc1.weight"], "c1_b": sd[p + "channel_mlp.fc1.bias"],
                       "c2": sd[p + "channel_mlp.fc2.weight"], "c2_b": sd[p + "channel_mlp.fc2.bias"]})
    return {"stem": sd["stem.weight"], "stem_b": sd["stem.bias"], "blocks": blocks,
            "norm_s": sd["norm.weight"], "norm_b": sd["norm.bias"], "head": sd["head.weight"], "head_b": sd["head.bias"]}
