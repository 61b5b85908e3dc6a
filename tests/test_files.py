"""The one write-then-rename: the old file or the new one, never half of either, and nothing left beside."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from mixer.errors import MixerError
from mixer.files import atomic_write, file_kind


def test_text_bytes_and_a_writer_each_replace_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "f.json"  # missing parents are created
    atomic_write(target, "naïve\n")
    assert target.read_bytes() == "naïve\n".encode("utf-8")  # UTF-8 whatever the locale, no newline translation
    atomic_write(target, b"\x00\xff")
    assert target.read_bytes() == b"\x00\xff"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"by the writer"))
    assert target.read_bytes() == b"by the writer"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_the_temporary_is_private_and_beside_the_target(tmp_path):
    seen = []

    def write(tmp):
        seen.append((tmp, stat.S_IMODE(os.stat(tmp).st_mode)))
        tmp.write_text("x")

    atomic_write(tmp_path / "f.txt", write)
    ((tmp, mode),) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".f.txt.") and tmp.name.endswith(".tmp")
    assert mode == 0o600  # private while it is written; the finished file gets the user's mode (below)


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "f.txt").symlink_to(victim)
    atomic_write(tmp_path / "f.txt", "new")
    assert victim.read_text() == "precious"
    assert not (tmp_path / "f.txt").is_symlink() and (tmp_path / "f.txt").read_text() == "new"


def test_atomic_write_errors_are_user_errors_only_when_the_system_refuses(tmp_path):
    (tmp_path / "keep.txt").write_text("before")

    def refused(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MixerError, match=f"^cannot write {tmp_path / 'keep.txt'}: No space left on device$"):
        atomic_write(tmp_path / "keep.txt", refused)

    def bug(tmp):
        raise OSError("not from the system")

    with pytest.raises(OSError, match="not from the system"):
        atomic_write(tmp_path / "keep.txt", bug)
    assert (tmp_path / "keep.txt").read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]  # no temporary file left behind


def test_without_user_error_the_system_error_is_the_callers_to_word(tmp_path):
    (tmp_path / "keep.txt").write_text("before")

    def refused(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as raised:
        atomic_write(tmp_path / "keep.txt", refused, user_error=False)
    assert raised.type is OSError and raised.value.errno == errno.ENOSPC
    with pytest.raises(NotADirectoryError):  # the folder cannot be made: a file stands in its way
        atomic_write(tmp_path / "keep.txt" / "sub" / "f", "x", user_error=False)
    with pytest.raises(MixerError, match="^cannot write .*keep.txt/sub/f: Not a directory$"):
        atomic_write(tmp_path / "keep.txt" / "sub" / "f", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "before"


def test_an_exception_that_is_no_os_error_leaves_nothing_behind(tmp_path):
    def fails(tmp):
        tmp.write_text("half")
        raise MixerError("the download was too large")

    with pytest.raises(MixerError, match="too large"):
        atomic_write(tmp_path / "f.bin", fails)
    assert list(tmp_path.iterdir()) == []


def test_file_kind_names_special_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    assert file_kind(os.stat(tmp_path / "fifo").st_mode) == "FIFO"
    assert file_kind(stat.S_IFSOCK) == "socket" and file_kind(stat.S_IFCHR) == "character device"
    assert file_kind(stat.S_IFBLK) == "block device" and file_kind(0) == "special file"


def test_a_written_file_gets_the_users_mode_and_a_private_one_0600(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "model.safetensors", b"weights")
        atomic_write(tmp_path / "record.json", "{}", private=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "record.json").stat().st_mode) == 0o600
