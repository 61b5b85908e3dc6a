"""A `mixer train` started by `dvc repro` stops (cleanly, with a checkpoint) when that DVC dies.

DVC runs a stage's command through `$SHELL -c` (`/bin/sh` when SHELL is unset). bash replaces itself
with the command, so DVC is our parent; dash (Debian's /bin/sh) stays in between, and a killed DVC
leaves the shell alive and us with it. So: the kernel's parent-death signal when DVC is the parent,
and a watcher of the shell's parent otherwise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

SHELLS = {"sh", "dash", "bash", "zsh", "fish", "ksh", "mksh", "busybox"}
POLL_SECONDS = 0.5


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid`, or None when it is gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])  # the name may hold spaces and ')'


def name_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def stop_when_dvc_dies() -> None:
    """Under DVC on Linux, ask for SIGTERM (a checkpoint and a stop) when the `dvc repro` that ran us dies."""
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    if name_of(parent) in SHELLS:
        dvc = parent_of(parent)
        if dvc is not None and dvc > 1:
            watch(parent, dvc)
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def watch(shell: int, dvc: int) -> None:
    """SIGTERM ourselves once `shell` is gone or no longer the child of `dvc` (an orphan is re-parented)."""
    def loop():
        while parent_of(shell) == dvc:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-dvc", daemon=True).start()
