"""benchmarks/gpu_check.sh, the GPU machine's one command, runs here in its dry-run mode (the CPU, tiny
sizes): every section but the device, so on a GPU machine it fails only for the device's reasons."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import HANG, ROOT

from test_e2e import tool_env

pytestmark = pytest.mark.slow  # about 30 s: it runs `pytest -m gpu` and `mixer predict` too


def test_the_dry_run_writes_every_section_and_a_table(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env={**tool_env(), "PYTHON": sys.executable}, capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert list(report) == ["environment", "tests", "peak", "train_step", "data_wait", "syncs", "predict"]
    assert not [name for (name, section) in report.items() if "error" in section]
    assert report["environment"]["dry_run"] is True and report["environment"]["fused_optimizer"] is False
    tests = report["tests"]
    assert tests["returncode"] == 0 and "skipped" in tests["summary"] and tests["skipped"]  # no CUDA here
    assert report["peak"]["tflops"] > 0
    for variant in ("S/16", "B/16"):
        step = report["train_step"][variant]
        assert step["ours"]["images_per_s"] > 0 and step["reference"]["images_per_s"] > 0 and 0 < step["ours"]["mfu"]
    assert 0 <= report["data_wait"]["data_wait_share"] < 1
    syncs = report["syncs"]
    assert syncs["steps_inside_epoch"] > 0 and syncs["syncs_per_step"] == 0  # the loop reads nothing inside an epoch
    assert sum(syncs["by_step"].values()) > 0  # the counter counts: the set-up and the epoch's end do read
    assert report["predict"]["rows_written"] == report["predict"]["images"] == 50
    for row in ("tests ", "peak ", "S/16", "B/16", "data wait", "host syncs", "predict"):
        assert row in done.stdout
