"""Real launchers, real signals: torchrun / accelerate launch data-parallel on CPU; SIGKILL and SIGTERM,
then the same command again continues the run."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, make_image_folder, only_run, read_until, write_params
from safetensors.torch import load_file
from test_e2e import ok, tool_env

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
MIXER = str(BIN / "mixer")
COMMON = ["--depth", "1", "--dim", "16", "--warmup-step", "0", "--crop-scale", "1", "1", "--no-progress"]
SGD = ["--optimizer", "sgd", "--lr", "0.05", "--num-steps", "2"]


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
    ok([MIXER, "prepare", "--workers", "1"], root)
    return root


def weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def launcher(kind: str) -> list[str]:
    if kind == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), MIXER]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
            free_port(), MIXER]


@pytest.mark.parametrize("kind", ["torchrun", "accelerate"])
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(project, kind):
    out = f"two_{kind}"
    ok(launcher(kind) + ["train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", out], project)
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "16", "--output-dir", "one"], project)
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "one_small"], project)
    one, two = weights(project / "one"), weights(project / out)
    assert max_difference(one, two) <= 1e-5
    # and the comparison can fail: one process with batch b takes other steps
    assert max_difference(one, weights(project / "one_small")) > 1e-3


# 180 images: 126 train (per class 42 of 60), batch 4: 31 optimizer steps an epoch, 124 in all. A checkpoint
# every 7 steps and at each epoch's end: steps 7, 14, 21, 28, 31, 38, ...
RUN = ["train", *COMMON, "--batch-size", "4", "--num-steps", "4", "--ema-decay", "0.9", "--crop-scale", "0.6", "1.0",
       "--mixup", "0.2", "--dropout", "0.1", "--checkpoint-every", "7"]


def start(args: list[str], project: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=project, env=env or tool_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def holding_env(step: int, hold: Path) -> dict:
    """The environment of a run that waits after optimizer step `step` until `hold`/release exists (tests/hooks)."""
    hold.mkdir()
    return dict(tool_env(), PYTHONPATH=str(ROOT / "tests" / "hooks"), MIXER_TEST_HOLD_AT_STEP=f"{step}:{hold}")


def wait_held(run: subprocess.Popen, hold: Path, ranks: tuple[str, ...] = ("0",)) -> None:
    """Until each rank of `run` waits at its step: a progress marker, not a guess at how long a step takes."""
    while not all((hold / f"held-{rank}").exists() for rank in ranks):
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.02)


def epochs_logged(project: Path) -> list[str]:
    """The steps of dvclive's learning-curve TSV: each epoch must appear once, in order."""
    rows = (project / "reports" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss"
    return [row.split("\t")[0] for row in rows[1:]]


def test_killed_and_stopped_runs_continue_to_the_same_weights(project, tmp_path):
    """SIGKILL inside a checkpoint write, SIGKILL after a mid-epoch checkpoint, SIGTERM: each time the same
    command continues from the last checkpoint, and the weights equal an uninterrupted run's."""
    ok([MIXER, *RUN, "--output-dir", "straight"], project)
    args = [MIXER, *RUN, "--output-dir", "crashed"]
    root = project / "checkpoints" / "crashed"

    env = tool_env()
    env["PYTHONPATH"] = str(ROOT / "tests" / "hooks")
    env["MIXER_TEST_PAUSE_IN_WRITE"] = str(tmp_path / "writing")
    run = start(args, project, env)
    while not (tmp_path / "writing").exists():
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.02)
    run.kill()
    run.wait()
    checkpoints = only_run(root)  # the run's own folder: checkpoints/crashed/<run>/
    assert Path((tmp_path / "writing").read_text()).exists(), "killed inside the write: its temporary file is there"
    assert Path((tmp_path / "writing").read_text()).parent == checkpoints
    assert not (checkpoints / "last.pt").exists() and not (root / "last.pt").exists()

    seen: list[str] = []
    run = start(args, project, holding_env(15, tmp_path / "hold15"))
    read_until(run, "checkpoint: step 14 (epoch 1)", seen)
    wait_held(run, tmp_path / "hold15")  # after step 15: no checkpoint since 14, and none can come
    run.kill()
    run.wait()
    assert not any(p.name.endswith(".tmp") for p in checkpoints.iterdir())  # the next run removed the leftover
    assert not any("continuing" in line for line in seen)  # nothing to continue from: it started over
    assert torch.load(checkpoints / "last.pt", weights_only=True)["position"]["step"] == 14
    assert only_run(root) == checkpoints  # the same params: the same folder
    last = f"checkpoints/crashed/{checkpoints.name}/last.pt"

    seen = []
    run = start(args, project, holding_env(40, tmp_path / "hold40"))  # it waits after step 40, between checkpoints
    assert f"continuing from {last}: epoch 1, step 14" in read_until(run, "continuing", seen)
    wait_held(run, tmp_path / "hold40")
    run.send_signal(signal.SIGTERM)
    (tmp_path / "hold40" / "release").write_text("")
    rest = run.communicate(timeout=300)[0]  # a failsafe
    assert run.returncode == 128 + signal.SIGTERM, rest
    stop = next(line for line in rest.splitlines() if line.startswith("stopped by SIGTERM: stopped at epoch 2, step "))
    step = int(stop.split("step ")[1].split(";")[0])
    assert step == 40  # the step the signal came in: it finished it, wrote a checkpoint and stopped
    assert not (project / "crashed" / "model.safetensors").exists()  # no model from an unfinished run

    log = ok(args, project)
    assert f"continuing from {last}: epoch 2, step {step}" in log
    assert max_difference(weights(project / "straight"), weights(project / "crashed")) <= 1e-6
    assert epochs_logged(project) == ["0", "1", "2", "3"]


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_continues(project, tmp_path):
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "ddp_straight"], project)
    # Several processes agree on a stop every --log-every steps (agreeing waits for all of them): at step 7
    train_args = ["train", *COMMON, *SGD, "--batch-size", "4", "--output-dir", "ddp", "--checkpoint-every", "3",
                  "--log-every", "7"]
    hold = tmp_path / "hold"
    run = start(launcher("torchrun") + train_args, project, holding_env(7, hold))  # both wait after step 7
    wait_held(run, hold, ranks=("0", "1"))
    rank1 = psutil.Process(int((hold / "held-1").read_text()))
    assert rank1.environ().get("RANK") == "1"
    rank1.send_signal(signal.SIGTERM)
    (hold / "release").write_text("")
    rest = run.communicate(timeout=300)[0]  # a failsafe
    stops = [line for line in rest.splitlines() if line.startswith("stopped by")]
    assert len(stops) == 2, rest  # both ranks stopped, each saying where
    assert {line.split(": ")[0] for line in stops} == {"stopped by SIGTERM", "stopped by request"}
    positions = {line.split("stopped at ")[1].split(";")[0] for line in stops}
    assert positions == {"epoch 1, step 7"}, stops  # at the same step: the one the signal came in
    log = ok(launcher("torchrun") + train_args, project)
    folder = only_run(project / "checkpoints" / "ddp")
    assert f"continuing from checkpoints/ddp/{folder.name}/last.pt: {positions.pop()}" in log
    assert max_difference(weights(project / "ddp_straight"), weights(project / "ddp")) <= 1e-5


def test_two_nodes_of_one_process_each_equal_one_process_with_the_global_batch(project):
    """Two machines, proven on one: two `torchrun --nnodes 2 --nproc_per_node 1` launches meeting through c10d
    rendezvous on localhost, each a "node" of one rank; the weights equal one process with batch 2b."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = ["train", *COMMON, *SGD, "--batch-size", "8", "--output-dir", "two_nodes"]
    nodes = [start([str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes", "--node_rank", str(rank), MIXER, *args],
                   project) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]  # a failsafe
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert "epoch 2:" in logs[0] + logs[1]
    ok([MIXER, "train", *COMMON, *SGD, "--batch-size", "16", "--output-dir", "one_node"], project)
    assert max_difference(weights(project / "one_node"), weights(project / "two_nodes")) <= 1e-5


RANKS_AGREE = """
import sys
import threading
from pathlib import Path

import torch
from mixer.engine import Machine, TrainConfig, _DeviceSums, _Run, make_accelerator
from mixer.errors import MixerError
from mixer.train_state import RunningSums
from pipeline.cli import leave_process_group

accelerator = make_accelerator(1, Machine())
rank = accelerator.process_index
told = []
sums = _DeviceSums(RunningSums(1.0, 2.0, 3.0) if rank == 0 else RunningSums(), accelerator.device)
logits, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
sums.add(torch.tensor(0.5), logits, labels, 1)
told.append(f"sums {sums.read(accelerator, TrainConfig(), 0)}")
(step, loss) = (5, float("nan")) if rank == 0 else (3, float("inf"))  # rank 1's is the earlier
sums.add(torch.tensor(loss), logits, labels, step)
sums.add(torch.tensor(float("nan")), logits, labels, step + 1)  # a later one is not the first
try:
    sums.read(accelerator, TrainConfig(), 1)
except MixerError as error:
    told.append(f"error {error}")
run = _Run(accelerator, *[None] * 9)
stop = threading.Event()
if rank == 1:
    stop.set()
told.append(f"agree {run.agree(stop, rank == 0)} {run.agree(None, False)}")
Path(sys.argv[1], f"rank{rank}.txt").write_text("\\n".join(told))  # printed lines of two ranks interleave
leave_process_group()
"""


def test_ranks_sum_their_losses_find_the_earliest_divergence_and_agree_on_stops(tmp_path):
    """What several processes share between steps, read exactly: the epoch's sums added over ranks, the first
    step whose loss was not finite on any rank (each rank says whether it saw that loss itself), and a stop or
    a due checkpoint asked on one rank, agreed by all."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_AGREE)
    env = {**tool_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ok([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), str(script), str(tmp_path)],
       tmp_path, env)
    advice = "lower lr (now 0.003) or raise clip_grad"
    for (rank, seen) in ((0, "not finite"), (1, "inf")):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == [
            "sums RunningSums(loss=3.0, correct=4.0, images=7.0)",
            f"error training diverged at epoch 2, step 3: the loss is {seen}; {advice}",
            "agree (True, True) (False, False)"]
