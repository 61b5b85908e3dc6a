"""Activation checkpointing per block (`MlpMixer.set_grad_checkpointing`, `Machine.grad_checkpointing`,
`mixer train --grad-checkpointing`): the same gradients with less memory, and the estimate knows it;
the optimizer kernel the engine picks per device (fused on CUDA, torch's default elsewhere)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

import mixer.model
from conftest import make_image_folder, write_params
from mixer.engine import Machine, train
from mixer.optim import build_optimizer, use_fused, wants_fused
from mixer.resources import training_memory
from pipeline.cli import app
from test_engine import PREP, config, max_difference, tiny_model, tiny_split, weights
from test_resources import LiveTensors, one_config, train_steps


def gradients(model, x, y, seed=7):
    """The gradients of one training step's loss, with torch's RNG (dropout, drop path) seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for (n, p) in model.named_parameters()}


def noisy_model():
    torch.manual_seed(0)
    model = mixer.model.create_model(image_shape=(8, 8), patch_shape=(2, 2), depth=3, dim=16, num_classes=3,
                                     dropout=0.2, drop_path=0.3)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a nonzero head: every layer gets a gradient
    return model.train()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(3, (6,), generator=g)


def counting_block_calls(monkeypatch) -> list:
    """Every run of a MixerBlock's forward (the recomputation calls no module hooks, so count the method)."""
    calls, forward = [], mixer.model.MixerBlock.forward

    def counted(self, x):
        calls.append(1)
        return forward(self, x)

    monkeypatch.setattr(mixer.model.MixerBlock, "forward", counted)
    return calls


def test_checkpointed_blocks_give_the_same_gradients_with_dropout_and_drop_path(monkeypatch):
    model, (x, y) = noisy_model(), batch()
    plain = gradients(model, x, y)
    model.set_grad_checkpointing(True)
    calls = counting_block_calls(monkeypatch)
    checkpointed = gradients(model, x, y)
    assert len(calls) == 2 * len(model.blocks)  # each block ran again in the backward: it was checkpointed
    # the same ops on the same values, the dropout masks replayed: equal to float rounding (here: bit for bit)
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-6
    assert all(v.abs().sum() > 0 for v in checkpointed.values())


def test_without_the_replayed_rng_state_the_gradients_differ(monkeypatch):
    """The control: the equality above depends on the recomputation drawing the forward's dropout masks."""
    model, (x, y) = noisy_model(), batch()
    plain = gradients(model, x, y)
    model.set_grad_checkpointing(True)
    monkeypatch.setattr(mixer.model, "checkpoint", functools.partial(torch.utils.checkpoint.checkpoint,
                                                                     preserve_rng_state=False))
    forgetful = gradients(model, x, y)
    assert max((plain[k] - forgetful[k]).abs().max().item() for k in plain) > 1e-3


def test_checkpointing_applies_only_where_a_backward_comes(monkeypatch):
    model, (x, _) = noisy_model(), batch()
    model.set_grad_checkpointing(True)
    calls = counting_block_calls(monkeypatch)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 2 * len(model.blocks)  # once per forward: nothing recomputed


@pytest.mark.parametrize(("side", "patch", "depth", "dim", "batch"), [
    (32, 4, 2, 128, 16),  # channel mixing dominates
    (64, 4, 4, 64, 8),    # 256 patches, four blocks: the kept block inputs count
    (32, 4, 6, 128, 16),  # deeper: the saving grows with depth
])
def test_the_estimate_with_checkpointing_is_the_peak_of_the_tensors_a_step_holds(side, patch, depth, dim, batch):
    torch.manual_seed(0)
    model = one_config(side, patch, depth, dim)
    model.set_grad_checkpointing(True)
    with LiveTensors(sum(p.numel() for p in model.parameters()) * 4) as tensors:
        train_steps(model, batch)
    estimate = training_memory(model.config, batch, grad_checkpointing=True)
    assert 1.0 <= estimate / tensors.peak <= 1.2, (estimate / 2**20, tensors.peak / 2**20)  # a bound, a close one
    assert estimate < training_memory(model.config, batch)


def test_a_checkpointed_run_trains_the_same_weights(tmp_path):
    cfg = config(epochs=2)
    runs = {}
    for gc in (False, True):
        model = tiny_model(dropout=0.1, drop_path=0.1)
        runs[gc] = weights(train(model, tiny_split(), tiny_split(12, seed=1), cfg, PREP, tmp_path / str(gc),
                                 {"run": "gc"}, Machine(grad_checkpointing=gc), False))
    assert max_difference(runs[False], runs[True]) <= 1e-5


# ---- the optimizer kernel ------------------------------------------------------------------------

def test_the_kernel_is_fused_on_cuda_only_and_a_checkpoint_does_not_change_it():
    assert wants_fused("cuda") and wants_fused(torch.device("cuda", 1))
    assert not wants_fused("cpu") and not wants_fused(torch.device("cpu"))
    model = tiny_model()
    for name in ("sgd", "adamw"):
        default = build_optimizer(model, name, 0.1, 0.9, 0.0)
        assert all(not g["fused"] for g in default.param_groups)  # on the CPU: torch's default (foreach)
        fused = build_optimizer(model, name, 0.1, 0.9, 0.0, fused=True)
        assert all(g["fused"] is True for g in fused.param_groups)
        default.load_state_dict(fused.state_dict())  # a checkpoint written on a GPU machine
        assert all(g["fused"] is True for g in default.param_groups)  # torch takes the saved groups' kernel
        use_fused(default, False)  # the engine puts this machine's back
        assert all(not g["fused"] for g in default.param_groups)


def fused_and_default_difference(device, steps: int = 4) -> dict[str, float]:
    """Per optimizer, the largest weight difference after `steps` updates by the default and the fused kernel.

    Both are fed the same gradients (the default's model's). Each on its own would drift apart by rounding
    alone: a Mixer's token-mixing fc2 bias shifts a patch by the same amount in every channel, which the
    next LayerNorm removes, so its gradient is float noise, which AdamW turns into full-size steps.
    """
    x, y = (t.to(device) for t in batch())
    out = {}
    for name in ("sgd", "adamw"):
        models = [noisy_model().eval().to(device) for _ in range(2)]
        optimizers = [build_optimizer(m, name, 0.01, 0.9, 0.05, fused=f) for (m, f) in zip(models, (False, True))]
        for _ in range(steps):
            F.cross_entropy(models[0](x), y).backward()
            for (a, b) in zip(models[0].parameters(), models[1].parameters()):
                b.grad = a.grad.clone()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        out[name] = max_difference(*({k: v.float().cpu() for (k, v) in m.state_dict().items()} for m in models))
    return out


def test_the_fused_update_equals_the_default_one_on_the_cpu_too():
    """CUDA is where the engine asks for it (tests/test_gpu.py checks it there); torch has CPU kernels too."""
    differences = fused_and_default_difference("cpu")
    assert all(d <= 1e-6 for d in differences.values()), differences


# ---- the command ---------------------------------------------------------------------------------

@pytest.fixture
def project(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "images", {"a": 12, "b": 12, "c": 12}, size=(8, 8))
    write_params(tmp_path / "params.yaml", data=str(tmp_path / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3, num_steps=1, depth=2, dim=16, batch_size=8, warmup_step=0, dropout=0.1)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_says_its_memory_estimate_and_takes_grad_checkpointing(project):
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    plain = runner.invoke(app, ["train", "--no-progress", "--output-dir", "plain"])
    assert plain.exit_code == 0, plain.output
    gc = runner.invoke(app, ["train", "--no-progress", "--output-dir", "gc", "--grad-checkpointing"])
    assert gc.exit_code == 0, gc.output
    lines = {name: next(line for line in r.output.splitlines() if line.startswith("memory: "))
             for (name, r) in (("plain", plain), ("gc", gc))}
    assert lines["plain"].startswith("memory: about ") and "activations at batch 8, precision fp32)" in lines["plain"]
    assert lines["gc"].endswith("precision fp32, activation checkpointing)")
    a, b = load_file(str(project / "plain" / "model.safetensors")), load_file(str(project / "gc" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert "grad_checkpointing" not in json.loads((project / "gc" / "config.json").read_text())["architecture"]


def test_the_memory_line_names_what_the_estimate_does_not_model():
    from conftest import ROOT
    from pipeline.params import load_params
    from pipeline.train import memory_line

    p = load_params(ROOT / "params.yaml", {})
    assert memory_line(3 << 30, p, Machine()) == ("memory: about 3.0 GiB for the training step (model, optimizer, "
                                                  f"activations at batch {p.batch_size}, precision fp32)")
    line = memory_line(3 << 30, p, Machine(mixed_precision="bf16", grad_checkpointing=True))
    assert line.endswith("precision fp32 (bf16 mixed precision not modelled), activation checkpointing)")
