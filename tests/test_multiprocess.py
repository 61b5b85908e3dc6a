"""Real launchers and real crashes: torchrun / accelerate launch data-parallel on CPU, SIGKILL + --resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_image_folder, write_params
from test_e2e import ok, tool_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
COMMON = ["--depth", "1", "--dim", "16", "--warmup-step", "0", "--crop-scale", "1", "1", "--no-progress"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    make_image_folder(root / "images", {"a": 60, "b": 60, "c": 60}, size=(8, 8))
    write_params(root / "params.yaml", data=str(root / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=3)
    ok([str(BIN / "mixer"), "prepare", "--workers", "1"], root)
    return root


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


SGD = ["--optimizer", "sgd", "--lr", "0.05", "--num-steps", "2"]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(project, launcher):
    mixer = str(BIN / "mixer")
    out = f"two_{launcher}"
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), mixer]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", free_port(), mixer]
    ok(cmd + ["train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", out], project)
    ok([mixer, "train", *COMMON, *SGD, "--batch-size", "16", "--output-dir", "one"], project)
    ok([mixer, "train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "one_small"], project)
    one, two = weights(project / "one"), weights(project / out)
    assert max_difference(one, two) <= 1e-5
    # and the comparison can fail: one process with batch b takes other steps
    assert max_difference(one, weights(project / "one_small")) > 1e-3


def read_until(process: subprocess.Popen, text: str, count: int = 1) -> None:
    seen = 0
    for line in process.stdout:
        if text in line:
            seen += 1
            if seen == count:
                return
    raise AssertionError(f"the run ended before printing {text!r} {count} time(s)")


def test_sigkill_mid_epoch_and_during_a_checkpoint_write_then_resume(project):
    mixer = str(BIN / "mixer")
    args = [mixer, "train", *COMMON, "--batch-size", "2", "--num-steps", "5", "--ema-decay", "0.9",
            "--crop-scale", "0.6", "1.0", "--mixup", "0.2", "--output-dir"]
    ok(args + ["straight"], project)

    env = tool_env()
    env["MIXER_TEST_PAUSE_SAVE_AT_EPOCH"] = "2"  # pause inside the write: temp file there, not renamed
    run = subprocess.Popen(args + ["crashed"], cwd=project, env=env, stdout=subprocess.PIPE, text=True)
    read_until(run, "saving checkpoint of epoch 2")
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    leftovers = list((project / "crashed" / "checkpoints").glob(".last.pt.*.tmp"))
    assert leftovers, "the kill should have hit the write"

    run = subprocess.Popen(args + ["crashed", "--resume"], cwd=project, env=tool_env(), stdout=subprocess.PIPE,
                           text=True)
    read_until(run, "epoch 3:")
    time.sleep(0.1)  # into epoch 4
    os.kill(run.pid, signal.SIGKILL)
    run.wait()

    ok(args + ["crashed", "--resume"], project)
    assert max_difference(weights(project / "straight"), weights(project / "crashed")) <= 1e-6
    payload = torch.load(project / "crashed" / "checkpoints" / "last.pt", weights_only=True)
    assert payload["epoch"] == 5 and [m["epoch"] for m in payload["history"]] == [1, 2, 3, 4, 5]
