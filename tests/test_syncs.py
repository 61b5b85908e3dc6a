"""The training step never waits for the device: the host reads a number back at most once per
`log_every` optimizer steps, outside the epoch boundary (evaluation and the checkpoint may).

A read is what makes the host wait for a GPU: `.item()`, `int(t)`, `float(t)`, `bool(t)` (all dispatch
to aten._local_scalar_dense), ops whose output size depends on the data (nonzero, masked_select,
boolean indexing), and copies to the host (`.tolist()`, `.cpu()`, `.numpy()`). On this CPU-only
machine nothing waits, so the test counts those calls instead. It leaves out the reads made inside
torch.optim: they read the optimizer's step counters, which stay on the host on a GPU
(capturable=False), so there they are no sync; every other tensor of the loop lives on the training
device.
"""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixer.augment import AugmentConfig
from mixer.data import Split
from mixer.engine import Machine, Reporter, TrainConfig, steps_per_epoch, train
from mixer.model import create_model
from mixer.preprocess import Preprocessing

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
         torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default}


def _in_optimizer() -> bool:
    return any("/torch/optim/" in frame.filename for frame in traceback.extract_stack())


class Reads(TorchDispatchMode):
    """Counts the host's reads of tensors, by the optimizer step they happen after."""

    def __init__(self):
        super().__init__()
        self.step, self.counts = 0, {}

    def count(self) -> None:
        if not _in_optimizer():
            self.counts[self.step] = self.counts.get(self.step, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in READS or boolean_index:
            self.count()
        return func(*args, **(kwargs or {}))


class Steps(Reporter):
    def __init__(self, reads: Reads):
        self.reads = reads

    def step(self, state):
        self.reads.step = state.step


def split(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    return Split(rng.integers(0, 255, size=(n, 8, 8, 3), dtype=np.uint8), labels.astype(np.int64),
                 [f"{i}" for i in range(n)], ["a", "b", "c"])


AUGMENTED = AugmentConfig(hflip=0.5, crop_scale=(0.5, 1.0), randaugment_n=2, mixup=0.2, cutmix=1.0)


@pytest.mark.parametrize("config", [
    TrainConfig(epochs=2, batch_size=4, warmup_epochs=1, augment=AUGMENTED, ema_decay=0.9, clip_grad=1.0),
    TrainConfig(epochs=2, batch_size=4, warmup_epochs=1, optimizer="sgd", grad_accum=2, label_smoothing=0.1),
], ids=["adamw-augmented-ema", "sgd-accumulated"])
def test_at_most_one_read_per_log_every_steps_inside_an_epoch(tmp_path, config, monkeypatch):
    reads = Reads()
    for name in ("tolist", "cpu", "numpy"):  # copies to the host: C methods the dispatcher does not see as reads
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            reads.count()
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.manual_seed(0)
    model = create_model(image_shape=(8, 8), patch_shape=(4, 4), depth=2, dim=16, num_classes=3)
    log_every = 4
    with reads:
        result = train(model, split(96, 0), split(12, 1), config, Preprocessing(), tmp_path / "run",
                       machine=Machine(log_every=log_every), resume=False, reporter=Steps(reads))
    spe = steps_per_epoch(96, config, 1)
    assert result.state.step == 2 * spe
    inside = {step: n for (step, n) in reads.counts.items() if step % spe != 0}  # not at a boundary, nor before
    # the first step
    reading = [s for s in range(1, 2 * spe) if s % spe and s % log_every == 0]
    assert inside == {s: 1 for s in reading}
