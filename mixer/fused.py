"""One Mixer block as a single autograd node with hand-written backward and reused buffers.

The block's math is unchanged (tests compare it with the plain modules, values and gradients).
What changes is the work around the matrix multiplies:

- Each block is one autograd node instead of about fifteen, each linear layer one GEMM with its
  bias fused, and the residual add folded into the GEMM that produces it (`addmm_` accumulates into
  a copy of the skip path).
- The backward reuses buffers in place: the gradient of a GELU output is written over that output
  once its weight gradient is taken, and the GELU backward runs in place on it.
- The large hidden activations (D_S × dim and patches × D_C per image) live in a `Workspace`
  that hands the same buffers back step after step. On CPU, every fresh tensor of that size is a
  fresh memory map whose pages fault in on first touch; reusing them removes that cost. On CUDA the
  caching allocator already does this, and the workspace costs nothing.

Used only where it applies (`applies`): float32/float64 weights, no autocast, no dropout or
stochastic depth while training, not while tracing, exporting or compiling. Everything else takes
the plain path in `mixer.model`. Backward through a block twice (`retain_graph=True`) is refused
with a clear error, because the buffers are recycled after the first backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

aten = torch.ops.aten

enabled = True  # the switch tests and the benchmark flip to compare with the plain path


@contextlib.contextmanager
def disabled():
    """Run the plain modules instead of the fused block (for comparisons)."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


class Workspace:
    """Free buffers by (shape, dtype, device, inference mode); `take` reuses one or allocates.

    A miss means the shapes changed (evaluation after training, another batch size): the idle
    buffers of every other shape are dropped first, so memory peaks at the larger of the two phases,
    never their sum.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[Tensor]] = defaultdict(list)
        self.allocated = 0  # buffers created so far (a test checks that steady state creates none)
        self.lock = threading.Lock()  # models may run in several threads (e.g. a web server's pool)

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (tuple(shape), like.dtype, like.device, torch.is_inference_mode_enabled())
        with self.lock:
            if self.free[key]:
                return self.free[key].pop()
            for other in [k for k in self.free if k != key]:
                del self.free[other]
            self.allocated += 1
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def idle_bytes(self) -> int:
        with self.lock:
            return sum(t.numel() * t.element_size() for ts in self.free.values() for t in ts)

    def give(self, *buffers: Tensor) -> None:
        with self.lock:
            for t in buffers:
                self.free[(tuple(t.shape), t.dtype, t.device, t.is_inference())].append(t)


WORKSPACE = Workspace()


class _Lease:
    """Buffers one forward holds until its backward; back to the workspace if the graph dies unused."""

    def __init__(self, *buffers: Tensor):
        self.buffers: tuple[Tensor, ...] | None = buffers

    def take_back(self) -> tuple[Tensor, ...]:
        if self.buffers is None:
            raise RuntimeError("backward through a fused Mixer block a second time is not supported "
                               "(its buffers are reused); run the model with mixer.fused.disabled() "
                               "to use retain_graph")
        buffers, self.buffers = self.buffers, None
        return buffers

    def __del__(self):
        if self.buffers is not None:
            WORKSPACE.give(*self.buffers)


def applies(block, x: Tensor) -> bool:
    """Whether the fused path computes exactly what the block's plain modules would."""
    if not enabled or x.dim() != 3 or x.dtype not in (torch.float32, torch.float64):
        return False
    if block.training and (block.drop_path_rate > 0 or block.token_mlp.drop.p > 0 or block.channel_mlp.drop.p > 0):
        return False
    if torch.is_autocast_enabled(x.device.type) or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    return all(p.dtype == x.dtype and p.device == x.device for p in block.parameters())


def _params(block) -> tuple[Tensor, ...]:
    t, c = block.token_mlp, block.channel_mlp
    return (block.token_norm.weight, block.token_norm.bias, t.fc1.weight, t.fc1.bias, t.fc2.weight, t.fc2.bias,
            block.channel_norm.weight, block.channel_norm.bias, c.fc1.weight, c.fc1.bias, c.fc2.weight, c.fc2.bias)


def mixer_block(block, x: Tensor) -> Tensor:
    """The block's forward on token-major x (patches, batch, dim), fused."""
    x = x.contiguous()
    approximate = block.token_mlp.approximate
    eps = block.token_norm.eps
    params = _params(block)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _MixerBlock.apply(x, approximate, eps, *params)
    out, buffers, _ = _forward(x, approximate, eps, *params)
    WORKSPACE.give(*buffers)
    return out


def _forward(x, approximate, eps, ln1_w, ln1_b, tw1, tb1, tw2, tb2, ln2_w, ln2_b, cw1, cb1, cw2, cb2):
    """The output, the workspace buffers (hidden layers and x1) and the rest the backward needs."""
    s, b, c = x.shape
    # token mixing: the normalised tokens as one (patches, batch·dim) matrix A. The hidden layer is
    # kept as (batch·dim, D_S), i.e. (W1·A)ᵀ: BLAS runs these skinny GEMMs about 1.7× faster in
    # that orientation when there are few patches, and no slower when there are many.
    a1, mean1, rstd1 = aten.native_layer_norm(x, [c], ln1_w, ln1_b, eps)
    h1 = torch.addmm(tb1, a1.view(s, b * c).t(), tw1.t(), out=WORKSPACE.take((b * c, tw1.shape[0]), x))
    g1 = aten.gelu.out(h1, approximate=approximate, out=WORKSPACE.take(h1.shape, x))
    x1 = torch.add(x, tb2.view(s, 1, 1), out=WORKSPACE.take(x.shape, x))  # skip + bias; the GEMM adds onto it
    x1.view(s, b * c).addmm_(tw2, g1.t())
    # channel mixing: the normalised tokens as one (patches·batch, dim) matrix, weights from the right
    a2, mean2, rstd2 = aten.native_layer_norm(x1, [c], ln2_w, ln2_b, eps)
    h2 = torch.addmm(cb1, a2.view(s * b, c), cw1.t(), out=WORKSPACE.take((s * b, cw1.shape[0]), x))
    g2 = aten.gelu.out(h2, approximate=approximate, out=WORKSPACE.take(h2.shape, x))
    out = torch.add(x1, cb2)
    out.view(s * b, c).addmm_(g2, cw2.t())
    return out, (h1, g1, h2, g2, x1), (a1, a2, mean1, rstd1, mean2, rstd2)


class _MixerBlock(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, approximate, eps, *params):
        out, buffers, saved = _forward(x, approximate, eps, *params)
        ctx.approximate = approximate
        ctx.lease = _Lease(*buffers)
        ctx.save_for_backward(x, *saved, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        h1, g1, h2, g2, x1 = ctx.lease.take_back()  # first: a second backward fails here, clearly
        (x, a1, a2, mean1, rstd1, mean2, rstd2,
         ln1_w, ln1_b, tw1, tb1, tw2, tb2, ln2_w, ln2_b, cw1, cb1, cw2, cb2) = ctx.saved_tensors
        s, b, c = x.shape
        approximate, need = ctx.approximate, ctx.needs_input_grad
        dout = dout.contiguous()
        # channel mixing, from the output back
        dy = dout.view(s * b, c)
        dcw2 = torch.mm(dy.t(), g2) if need[13] else None
        dcb2 = dy.sum(0) if need[14] else None
        dh2 = torch.mm(dy, cw2, out=g2)  # g2 is spent: its buffer takes the gradient, in place
        aten.gelu_backward.grad_input(dh2, h2, approximate=approximate, grad_input=dh2)
        dcw1 = torch.mm(dh2.t(), a2.view(s * b, c)) if need[11] else None
        dcb1 = dh2.sum(0) if need[12] else None
        da2 = torch.mm(dh2, cw1, out=a2.view(s * b, c)).view(s, b, c)  # a2 is spent too
        dx1, dln2_w, dln2_b = aten.native_layer_norm_backward(da2, x1, [c], mean2, rstd2, ln2_w, ln2_b,
                                                               [True, need[9], need[10]])
        dx1 += dout  # the skip path
        # token mixing
        du = dx1.view(s, b * c)
        dtw2 = torch.mm(du, g1) if need[7] else None
        dtb2 = du.sum(1) if need[8] else None
        dh1 = torch.mm(du.t(), tw2, out=g1)  # (batch·dim, D_S), as h1
        aten.gelu_backward.grad_input(dh1, h1, approximate=approximate, grad_input=dh1)
        dtw1 = torch.mm(a1.view(s, b * c), dh1).t() if need[5] else None
        dtb1 = dh1.sum(0) if need[6] else None
        da1 = torch.mm(tw1.t(), dh1.t(), out=a1.view(s, b * c)).view(s, b, c)
        dx, dln1_w, dln1_b = aten.native_layer_norm_backward(da1, x, [c], mean1, rstd1, ln1_w, ln1_b,
                                                             [True, need[3], need[4]])
        dx += dx1
        WORKSPACE.give(h1, g1, h2, g2, x1)
        return (dx, None, None, dln1_w, dln1_b, dtw1, dtb1, dtw2, dtb2, dln2_w, dln2_b, dcw1, dcb1, dcw2, dcb2)

