"""A `mixer train` started by `dvc repro` stops (cleanly, with a checkpoint) when that DVC dies.

DVC runs a stage's command through `$SHELL -c` (`/bin/sh` when SHELL is unset), with DVC_STAGE in
its environment. bash replaces itself with the command, so DVC is our parent; dash (Debian's
/bin/sh) stays in between, as do wrappers (`bash train.sh`, `uv run`), and a killed DVC leaves them
and us running. So DVC is the first ancestor without DVC_STAGE in its environment: the kernel's
parent-death signal covers it when it is our parent, and a watcher of the process below it otherwise.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

POLL_SECONDS = 0.5


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid`, or None when it is gone (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])  # the name may hold spaces and ')'


def under_dvc(pid: int) -> bool | None:
    """Whether `pid` runs inside a DVC stage (DVC_STAGE in its environment); None if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return any(entry.startswith(b"DVC_STAGE=") for entry in f.read().split(b"\0"))
    except OSError:
        return None


def find_dvc() -> tuple[int, int] | None:
    """(DVC's pid, the pid of its child on our line), or None when the line cannot be read."""
    child, pid = os.getpid(), os.getppid()
    while pid > 1:
        inside = under_dvc(pid)
        if inside is None:
            return None
        if not inside:
            break
        child, pid = pid, parent_of(pid)
        if pid is None:
            return None
    return pid, child


def command_of(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def stop_when_dvc_dies() -> None:
    """Under DVC on Linux, ask for SIGTERM (a checkpoint and a stop) when the `dvc repro` that ran us dies."""
    if "DVC_STAGE" not in os.environ or not sys.platform.startswith("linux"):
        return
    found = find_dvc()
    if found is None:
        return
    (dvc, child) = found
    if dvc == 1 and b"dvc" not in command_of(1):  # DVC died before we got here; init adopted its children
        os.kill(os.getpid(), signal.SIGTERM)
    elif child == os.getpid():
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != dvc:  # it died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)
    else:
        watch(child, dvc)


def watch(child: int, dvc: int) -> None:
    """SIGTERM ourselves once `child` is gone or no longer DVC's (an orphan is re-parented)."""
    def loop():
        while parent_of(child) == dvc:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=loop, name="watch-dvc", daemon=True).start()
