"""On a CUDA GPU: the same numbers as on the CPU, and what the GPU path adds (fused optimizer kernels,
bf16 autocast, a resume that continues exactly, data-parallel over two GPUs).

Every test here is marked `gpu` and skipped without CUDA, so the CPU suite lists them as skipped
(`pytest -rs` says why). On a GPU machine: `pytest -m gpu -q -rs`, or benchmarks/gpu_check.sh.

Tolerances, and why:
  fp32 GPU vs CPU     forward logits and every gradient within 1e-4 of the tensor's largest magnitude
                      (TF32 off: different GEMM blocking and reduction order only, ~1e-6 seen on such sizes)
  bf16 vs fp32        logits within 5e-2 of their largest magnitude (bf16 keeps 8 significant bits, ~4e-3
                      per rounding, through a few blocks)
  fused vs default    weights within 1e-5 (SGD) and 1e-5 (AdamW) after 4 steps on the same gradients
  2 GPUs vs 1         weights within 1e-4 after 2 epochs (the all-reduce sums gradients in another order)
  resume              bit for bit, as on the CPU, once two straight runs are bit for bit (checked first)
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from mixer.engine import Interrupted, Machine, train
from mixer.model import create_model
from test_engine import PREP, Record, config, max_difference, only_run, tiny_model, tiny_split, weights
from test_grad_checkpointing import batch, fused_and_default_difference, gradients, noisy_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 GEMMs for the comparisons (TF32 keeps 10 bits: a deliberate loss, not a bug)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()


def mid_model():
    """Big enough for real GEMM tiling (196 patches, dim 128), small enough for seconds."""
    torch.manual_seed(0)
    model = create_model(image_shape=(56, 56), patch_shape=(4, 4), depth=2, dim=128, num_classes=10)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    return model


def test_fp32_forward_and_backward_on_the_gpu_equal_the_cpu():
    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    results = {}
    for device in ("cpu", "cuda"):
        model = mid_model().to(device)
        logits = model(x.to(device))
        F.cross_entropy(logits, y.to(device)).backward()
        results[device] = logits.detach(), {n: p.grad for (n, p) in model.named_parameters()}
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = results["cpu"], results["cuda"]
    assert relative(cpu_logits, gpu_logits) <= 1e-4
    worst = max(relative(cpu_grads[n], gpu_grads[n]) for n in cpu_grads)
    assert worst <= 1e-4, worst


def test_bf16_autocast_forward_is_close_to_fp32():
    model = mid_model().cuda().eval()
    x = torch.randn(8, 3, 56, 56, device="cuda")
    with torch.no_grad():
        exact = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(x)
    assert half.dtype == torch.bfloat16
    assert relative(exact, half) <= 5e-2


def test_fused_optimizer_kernels_equal_the_default_ones():
    differences = fused_and_default_difference("cuda")
    assert differences["sgd"] <= 1e-5 and differences["adamw"] <= 1e-5, differences


def test_grad_checkpointing_on_the_gpu_replays_dropout():
    model, (x, y) = noisy_model().cuda(), batch()
    x, y = x.cuda(), y.cuda()
    plain = gradients(model, x, y)
    model.set_grad_checkpointing(True)
    checkpointed = gradients(model, x, y)
    assert max((plain[k] - checkpointed[k]).abs().max().item() for k in plain) <= 1e-6


def gpu_run(folder, reporter=None, stop=None, resume=None):
    return train(tiny_model(dropout=0.1, drop_path=0.1), tiny_split(), tiny_split(12, seed=1), config(epochs=2),
                 PREP, folder, {"run": "gpu"}, Machine(stop=stop), resume, reporter or Record())


def test_a_run_stopped_after_an_epoch_on_the_gpu_continues_exactly(tmp_path):
    straight, again = gpu_run(tmp_path / "a"), gpu_run(tmp_path / "b")
    assert max_difference(weights(straight), weights(again)) == 0, "two straight GPU runs differ: not deterministic"
    assert straight.folder == only_run(tmp_path / "a")  # the run's own folder: tmp_path/a/<run>/
    payload = torch.load(straight.folder / "last.pt", map_location="cpu", weights_only=True)
    assert all(g["fused"] is True for g in payload["optimizer"]["param_groups"])  # the engine chose fused on CUDA
    stop = threading.Event()
    with pytest.raises(Interrupted) as caught:  # 6 steps an epoch: asked at step 6, it stops once epoch 1 is scored
        gpu_run(tmp_path / "part", Record(stop_at=6, stop=stop), stop)
    assert caught.value.path == only_run(tmp_path / "part") / "last.pt"
    resumed_record = Record()
    resumed = gpu_run(tmp_path / "part", resumed_record, resume=True)
    assert resumed_record.steps[0] == 7
    assert resumed_record.notes[0] == f"continuing from {caught.value.path}: epoch 2, step 6"
    assert max_difference(weights(straight), weights(resumed)) == 0


@TWO_GPUS
def test_two_gpus_with_batch_b_equal_one_gpu_with_batch_2b(tmp_path_factory):
    from test_multiprocess import COMMON, MIXER, SGD, launcher, weights as saved
    from conftest import make_image_folder, write_params
    from test_e2e import ok

    root = tmp_path_factory.mktemp("ddp")
    make_image_folder(root / "images", {"a": 60, "b": 60, "c": 60}, size=(8, 8))
    write_params(root / "params.yaml", data=str(root / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3)
    ok([MIXER, "prepare", "--workers", "1"], root)
    ok(launcher("torchrun") + ["train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "two"], root)
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "16", "--output-dir", "one"], root)
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "one_small"], root)
    one, two, small = saved(root / "one"), saved(root / "two"), saved(root / "one_small")
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-4
    assert max((one[k] - small[k]).abs().max().item() for k in one) > 1e-3  # the control: batch b differs
