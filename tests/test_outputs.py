"""Outputs are complete or untouched: one writer at a time, staged aside, swapped in at the end."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from mixer.errors import MixerError
from pipeline.outputs import writing

HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from pipeline.outputs import writing
with writing("mixer prepare", Path({target!r})) as staging:
    staging.dir(Path({target!r}))
    Path({ready!r}).write_text("locked")
    while not Path({release!r}).exists():
        time.sleep(0.02)
"""


def test_a_second_writer_stops_at_once_and_names_the_first(tmp_path):
    target, ready, release = tmp_path / "prepared", tmp_path / "ready", tmp_path / "release"
    target.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), target=str(target),
                                                                   ready=str(ready), release=str(release))])
    try:
        while not ready.exists():
            assert holder.poll() is None, "the holder died"
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(MixerError) as caught:
            with writing("mixer prepare", target):
                pass
        assert time.monotonic() - started < 2  # at once, not after waiting
        assert f"is being written by another mixer prepare (pid {holder.pid})" in str(caught.value)
        assert str(caught.value).startswith(str(target))
    finally:
        release.write_text("")
        holder.wait(timeout=20)
    with writing("mixer prepare", target):  # released with its process
        pass


def test_success_swaps_the_new_contents_in(tmp_path):
    target, report = tmp_path / "out", tmp_path / "report.json"
    target.mkdir()
    (target / "old.txt").write_text("old")
    report.write_text("old")
    with writing("test", target, report) as staging:
        new, file = staging.dir(target), staging.file(report)
        (new / "new.txt").write_text("new")
        file.write_text("new")
        assert not (target / "new.txt").exists() and report.read_text() == "old"  # nothing visible before the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and report.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.json"]  # no staging left


def test_failure_leaves_the_targets_as_they_were(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    with pytest.raises(RuntimeError):
        with writing("test", target) as staging:
            (staging.dir(target) / "half.txt").write_text("half")
            raise RuntimeError("the work failed")
    assert sorted(p.name for p in target.iterdir()) == ["kept.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_next_writer_repairs_what_a_killed_one_left(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out.old-{os.getpid() + 1}"   # killed between its two renames: the target is gone
    old.mkdir()
    (old / "model.txt").write_text("previous")
    (tmp_path / ".out.x1y2.partial").mkdir()         # killed while writing
    (tmp_path / ".out.z3.partial").write_text("half")
    with writing("test", target):
        assert (target / "model.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_file_where_a_folder_goes_is_refused_before_any_work(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(MixerError, match="exists and is not a folder"):
        with writing("test", tmp_path / "out") as staging:
            staging.dir(tmp_path / "out")
    (tmp_path / "dir").mkdir()
    with pytest.raises(MixerError, match="is a folder; give a file path"):
        with writing("test", tmp_path / "dir") as staging:
            staging.file(tmp_path / "dir")


def test_an_unwritable_place_is_one_line(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "proc" / "out"  # root ignores permissions; a path under a file cannot be made
        (tmp_path / "proc").write_text("a file")
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = tmp_path / "ro" / "out"
    with pytest.raises(MixerError, match="cannot write beside"):
        with writing("test", target) as staging:
            staging.dir(target)


def test_a_linked_output_folder_is_written_where_the_link_points(tmp_path):
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "big-disk")
    with writing("test", tmp_path / "out") as staging:
        (staging.dir(tmp_path / "out") / "model.txt").write_text("new")
    assert (tmp_path / "out").is_symlink() and (tmp_path / "big-disk" / "model.txt").read_text() == "new"
