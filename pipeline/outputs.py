"""Outputs that are complete or untouched: one writer per path, written aside, swapped in at the end.

A command takes an exclusive lock on every path it writes (a second writer stops at once, naming
the first), writes new contents into hidden staging paths beside the targets, and moves them over
the targets only when all its work has succeeded. A command that fails, or is killed, leaves the
targets as they were; what a killed one left beside them is cleaned up by the next writer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from mixer.errors import MixerError

LOCKS = Path(tempfile.gettempdir()) / f"mixer-locks-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


class Staging:
    """New contents for target paths, moved over them by `commit`."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (staging path, target)

    def dir(self, target: Path) -> Path:
        """An empty folder that becomes `target` (a folder) at the end."""
        if Path(target).exists() and not Path(target).is_dir():
            raise MixerError(f"{target} exists and is not a folder; move it away or choose another path")
        return self._stage(target, tempfile.mkdtemp)

    def file(self, target: Path) -> Path:
        """A path to write that becomes `target` (a file) at the end."""
        if Path(target).is_dir():
            raise MixerError(f"{target} is a folder; give a file path")
        return self._stage(target, tempfile.mkstemp)

    def _stage(self, target: Path, make) -> Path:
        target = Path(target).resolve() if Path(target).is_symlink() else Path(target)  # write where a link points
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            made = make(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        except OSError as exc:
            raise MixerError(f"cannot write beside {target}: {exc.strerror}") from None
        if isinstance(made, tuple):  # mkstemp: (fd, path)
            os.close(made[0])
            made = made[1]
        self.staged.append((Path(made), target))
        return Path(made)

    def commit(self) -> None:
        for (new, target) in self.staged:
            if new.is_dir() and target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.rename(target, old)
                os.rename(new, target)
                shutil.rmtree(old)
            else:
                os.replace(new, target)
        self.staged = []

    def discard(self) -> None:
        for (new, _) in self.staged:
            if new.is_dir():
                shutil.rmtree(new, ignore_errors=True)
            else:
                new.unlink(missing_ok=True)
        self.staged = []


@contextmanager
def writing(command: str, *targets: Path) -> Iterator[Staging]:
    """Hold the lock of every target for `command`, clean up after killed writers, stage, then commit.

    Locks are taken in the order given (the main output first, so a clash names it) and never waited
    for, so two commands cannot deadlock.
    """
    held = []
    try:
        for target in dict.fromkeys(Path(t).resolve() for t in targets):
            held.append(_lock(target, command))
            _recover(target)
        staging = Staging()
        try:
            yield staging
            staging.commit()
        finally:
            staging.discard()
    finally:
        for lock in reversed(held):
            lock.release()


def _lock(target: Path, command: str) -> FileLock:
    """The exclusive lock of one path (keyed by its absolute path), or an error naming its holder."""
    key = hashlib.sha256(os.fsencode(target)).hexdigest()[:20]
    try:
        LOCKS.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise MixerError(f"cannot create the lock folder {LOCKS}: {exc.strerror}") from None
    lock, owner = FileLock(LOCKS / f"{key}.lock"), LOCKS / f"{key}.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(owner.read_text())
            holder = f"another {who['command']} (pid {who['pid']})"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "another mixer command"
        raise MixerError(f"{_shown(target)} is being written by {holder}; wait for it to finish or stop it") from None
    owner.write_text(json.dumps({"command": command, "pid": os.getpid(), "argv": sys.argv}))
    return lock


def _shown(target: Path) -> str:
    """The path as the user most likely wrote it: relative to the working directory when inside it."""
    try:
        return str(target.relative_to(Path.cwd()))
    except ValueError:
        return str(target)


def _recover(target: Path) -> None:
    """Undo what a killed writer of `target` left: put back a folder caught mid-swap, drop staging."""
    if not target.parent.is_dir():
        return
    old = sorted(target.parent.glob(f".{glob.escape(target.name)}.old-*"))
    if old and not target.exists():
        os.rename(old.pop(), target)
    for path in old + sorted(target.parent.glob(f".{glob.escape(target.name)}.*.partial")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
