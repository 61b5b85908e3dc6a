"""Files on disk: replacing one at once (`atomic_write`) and naming what a path is (`file_kind`).

`atomic_write` is the one write-then-rename of the project: model files, `last.pt`, downloaded
weights and lock records all go through it, so a crash leaves the old file or the new one, never
half of either. (A command's staged outputs, which may be folders, are swapped in by
`pipeline.outputs`.)
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from mixer.errors import MixerError

Content = bytes | str | Callable[[Path], object]


def atomic_write(path: Path, content: Content, user_error: bool = True, private: bool = False) -> None:
    """Write `content` to a temporary beside `path`, then rename it over `path`: a crash never leaves a
    half-written file, and the file that was there stays as it was until the rename.

    content: bytes, text (written as UTF-8), or a function `write(tmp_path)` that writes the temporary
    file itself (`torch.save`, safetensors). The temporary is hidden and private
    (`.<name>.<random>.tmp`, mode 0600) and is removed if anything fails; missing parent folders are
    created. With `user_error`, a write the system refuses (disk full, file too large, read-only, no
    permission) is a MixerError naming the path; without it the OSError is raised as it is, for a
    caller that words the failure itself. Any other exception is raised as it is. The file gets the
    mode any file the user makes gets (0666 less the umask), unless `private` (0600: lock records).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if not user_error:
            raise
        raise MixerError(f"cannot write {path}: {exc.strerror}") from None
    try:
        if callable(content):
            os.close(fd)
            content(Path(tmp))
        else:
            with os.fdopen(fd, "wb") as file:  # through the descriptor mkstemp opened: the name is not reopened
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno is None or not user_error:  # errno None: not the system refusing a write, a bug
            raise
        raise MixerError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def file_kind(mode: int) -> str:
    """What a path that is neither a folder nor a regular file is, in words (from its st_mode)."""
    for (test, name) in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                         (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
