"""The fused Mixer block: the same values and gradients as the paper's equations and the plain
modules, buffers reused step after step, and the plain path wherever fusion does not apply."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from mixer import fused
from mixer.model import create_model
from reference import from_state_dict, mixer_forward


def _model(form="exact", depth=2, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = create_model(image_shape=(12, 12), patch_shape=(3, 3), depth=depth, dim=12, num_classes=5,
                         gelu=form, **kw).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a nonzero head and biases, so every gradient term counts
    return model


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {k: p.grad for (k, p) in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("form", ["exact", "tanh"])
def test_gradients_match_the_papers_equations(form, monkeypatch):
    model = _model(form)
    x, y = torch.randn(4, 3, 12, 12, dtype=torch.float64), torch.tensor([0, 1, 2, 4])
    calls = []
    monkeypatch.setattr(fused._MixerBlock, "backward", _counting(fused._MixerBlock.backward, calls))
    loss, grads = _loss_and_grads(model, x, y)
    assert len(calls) == 2  # both blocks went through the hand-written backward
    leaves = {k: v.detach().clone().requires_grad_() for (k, v) in model.state_dict().items()}
    expected = F.cross_entropy(mixer_forward(x, from_state_dict(leaves), (3, 3), form), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-12)
    assert set(grads) == set(leaves)
    for (name, g) in grads.items():
        torch.testing.assert_close(g, leaves[name].grad, atol=1e-12, rtol=1e-9, msg=name)


def _counting(backward, calls):
    def wrapped(ctx, *grads):
        calls.append(1)
        return backward(ctx, *grads)
    return staticmethod(wrapped)


def test_training_steps_equal_the_plain_path_and_reuse_buffers(monkeypatch):
    calls = []
    fused_block = fused.mixer_block
    monkeypatch.setattr(fused, "mixer_block", lambda *args: calls.append(1) or fused_block(*args))
    ours, plain = _model(), _model()
    x, y = torch.randn(6, 3, 12, 12, dtype=torch.float64), torch.randint(5, (6,))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, plain)]
    allocated = []
    for step in range(4):
        for (model, opt, path) in ((ours, opts[0], contextlib.nullcontext()), (plain, opts[1], fused.disabled())):
            with path:
                _loss_and_grads(model, x, y)
            opt.step()
        allocated.append(fused.WORKSPACE.allocated)
    assert len(calls) == 4 * 2  # ours ran fused: 4 steps, 2 blocks; the plain model never did
    assert allocated[1] == allocated[-1]  # after the first step every buffer comes from the workspace
    for (a, b) in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_two_forwards_before_one_backward_keep_their_own_buffers():
    """Gradient accumulation inside one graph: the second forward must not overwrite the first's."""
    model = _model()
    x1, x2 = torch.randn(2, 2, 3, 12, 12, dtype=torch.float64)
    y = torch.tensor([1, 3])

    def accumulate():
        model.zero_grad(set_to_none=True)
        (F.cross_entropy(model(x1), y) + F.cross_entropy(model(x2), y)).backward()
        return [p.grad.clone() for p in model.parameters()]

    got = accumulate()
    with fused.disabled():
        want = accumulate()
    for (a, b) in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


def test_frozen_parameters_get_no_gradient_and_the_rest_are_right():
    model = _model()
    for block in model.blocks:
        block.token_mlp.requires_grad_(False)
        block.channel_norm.requires_grad_(False)
    x, y = torch.randn(3, 3, 12, 12, dtype=torch.float64), torch.tensor([0, 1, 2])
    _, got = _loss_and_grads(model, x, y)
    with fused.disabled():
        _, want = _loss_and_grads(model, x, y)
    assert set(got) == set(want) and not any("token_mlp" in k or "channel_norm" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_inference_equals_the_plain_path(mode):
    model = _model(dtype=torch.float32).eval()
    x = torch.randn(5, 3, 12, 12)
    with mode():
        got = model(x)
        with fused.disabled():
            want = model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_second_backward_through_the_graph_is_refused_clearly():
    model = _model()
    loss = model(torch.randn(2, 3, 12, 12, dtype=torch.float64)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_plain_path_where_fusion_does_not_apply(monkeypatch):
    fused_block = fused.mixer_block
    def refuse(*args):
        raise AssertionError("the fused block ran where it does not apply")

    x = torch.randn(2, 3, 12, 12)
    noisy = _model(dtype=torch.float32, dropout=0.1).train()
    monkeypatch.setattr(fused, "mixer_block", refuse)
    noisy(x).sum().backward()  # dropout while training: plain path
    model = _model(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
    with fused.disabled():
        model(x)
    calls = []
    monkeypatch.setattr(fused, "mixer_block", lambda *args: calls.append(1) or fused_block(*args))
    noisy.eval()(x)  # evaluation turns dropout off: fused again
    assert len(calls) == 2


def test_deepcopy_and_state_dict_are_unchanged():
    model = _model()
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), clone(x))
    assert all(k.startswith(("stem", "blocks", "norm", "head")) for k in model.state_dict())


def test_evaluation_after_training_frees_the_training_buffers():
    """Memory peaks at the larger phase, not at training plus evaluation."""
    model = _model(dtype=torch.float32)
    x, y = torch.randn(8, 3, 12, 12), torch.randint(5, (8,))
    for _ in range(2):
        _loss_and_grads(model, x, y)
    training = fused.WORKSPACE.idle_bytes()
    assert training > 0
    with torch.inference_mode():
        model.eval()(torch.randn(2, 3, 12, 12))
    assert fused.WORKSPACE.idle_bytes() < training
    assert fused.WORKSPACE.free and all(inference for (*_, inference) in fused.WORKSPACE.free)


def test_concurrent_threads_get_their_own_buffers():
    """Forwards and backwards running at once in several threads (a server's pool) never share a
    buffer: each thread's outputs and gradients equal the plain path's."""
    from concurrent.futures import ThreadPoolExecutor

    models = [_model(dtype=torch.float32) for _ in range(4)]
    plain = _model(dtype=torch.float32)
    inputs = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    y = torch.randint(5, (8,))
    with fused.disabled():
        expected = [_loss_and_grads(plain, x, y) for x in inputs]

    def run(i):
        results = []
        for _ in range(20):
            with torch.inference_mode():
                results.append(("infer", models[i](inputs[i])))
            results.append(("train", _loss_and_grads(models[i], inputs[i], y)))
        return results

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, range(4)))
    with torch.inference_mode(), fused.disabled():
        logits = [plain(x) for x in inputs]
    for (i, results) in enumerate(outcomes):
        for (kind, value) in results:
            if kind == "infer":
                torch.testing.assert_close(value, logits[i], atol=1e-5, rtol=1e-5)
            else:
                torch.testing.assert_close(value[0], expected[i][0], atol=1e-5, rtol=1e-5)
                for (name, g) in value[1].items():
                    torch.testing.assert_close(g, expected[i][1][name], atol=1e-5, rtol=1e-5, msg=name)
