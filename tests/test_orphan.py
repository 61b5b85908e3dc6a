"""Finding the `dvc repro` above a training process, through any shells and wrappers between."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

# A stand-in for DVC: it starts `$SHELL -c "... python child"` with DVC_STAGE set, as DVC does.
# The watcher's checks are counted: after its third look at a live DVC the child prints "watched", a
# progress marker that replaces waiting a while and hoping the watcher looked.
CHILD = """
import os, signal, sys, threading, time
sys.path.insert(0, os.environ["ROOT"])
import pipeline.orphan as orphan
from pipeline.orphan import find_dvc, stop_when_dvc_dies
signal.signal(signal.SIGTERM, lambda *a: (print("SIGTERM", flush=True), os._exit(3)))
print("found", *find_dvc(), flush=True)
orphan.POLL_SECONDS = 0.01
looks, parent_of = [], orphan.parent_of
def counted_parent_of(pid):
    parent = parent_of(pid)
    if threading.current_thread().name == "watch-dvc":
        looks.append(parent)
        if len(looks) == 3:
            print("watched", flush=True)
    return parent
orphan.parent_of = counted_parent_of
stop_when_dvc_dies()
time.sleep(600)  # a failsafe only: the test's SIGKILL of the group ends it
"""


def start(tmp_path, shell_command: str) -> tuple[subprocess.Popen, list[str]]:
    (tmp_path / "child.py").write_text(CHILD)
    fake_dvc = (f"import os, subprocess, sys; p = subprocess.Popen({shell_command!r}, shell=True, "
                f"env={{**os.environ, 'DVC_STAGE': 'train'}}); print('dvc', os.getpid(), flush=True); p.wait()")
    env = {**os.environ, "ROOT": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", fake_dvc], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    lines = [process.stdout.readline(), process.stdout.readline()]
    return process, lines


def test_dvc_is_found_through_a_shell_and_a_wrapper_and_its_death_stops_training(tmp_path):
    (tmp_path / "train.sh").write_text(f"{sys.executable} child.py\necho done\n")
    dvc, lines = start(tmp_path, "/bin/dash -c 'bash train.sh; true'")
    try:
        assert lines[0].split() == ["dvc", str(dvc.pid)]
        (word, found, child) = lines[1].split()
        assert (word, int(found)) == ("found", dvc.pid)
        assert int(child) in [p.pid for p in psutil.Process(dvc.pid).children()]  # the watched one is DVC's child
        # the watcher looked three times at a live DVC and sent nothing: "SIGTERM" would come first
        assert dvc.stdout.readline().strip() == "watched"
        assert dvc.poll() is None
        dvc.kill()
        dvc.wait()
        assert dvc.stdout.readline().strip() == "SIGTERM"
    finally:
        os.killpg(dvc.pid, signal.SIGKILL)
