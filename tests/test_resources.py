"""Resources are checked before they are spent: training memory (estimated, and measured against a real step),
disk for `prepare` and downloads, download size and time, the sizes an `.npz` declares, a full disk."""

from __future__ import annotations

import ctypes
import errno
import http.server
import io
import os
import resource
import shutil
import threading
import weakref
import zipfile
from collections import namedtuple
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from typer.testing import CliRunner

import mixer.resources as resources
from conftest import make_image_folder, write_params
from mixer.checkpoint import read_tensors
from mixer.errors import MixerError
from mixer.model import MixerConfig, create_model, variant_fields
from mixer.optim import build_optimizer
from mixer.pretrained import download
from mixer.resources import parameter_count, prepared_bytes, training_memory
from pipeline.cli import app
from test_pretrained import _Server

Usage = namedtuple("Usage", "total used free")
MiB = 1 << 20


# ---- memory ------------------------------------------------------------------------------------

def one_config(side: int, patch: int, depth: int, dim: int):
    return create_model(image_shape=(side, side), patch_shape=(patch, patch), depth=depth, dim=dim, num_classes=10)


def train_steps(model, batch: int, steps: int = 2) -> None:
    """AdamW steps as the engine takes them; the second holds the moments the first created."""
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.9, 0.05)
    c = model.config
    x, y = torch.randn(batch, c.in_chans, *c.image_shape), torch.zeros(batch, dtype=torch.long)
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_parameter_count_is_the_models():
    for model in (one_config(32, 4, 2, 64), create_model(image_shape=(16, 20), patch_shape=(4, 5), depth=3, dim=24,
                                                         token_hidden=7, channel_hidden=50, num_classes=3)):
        assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed; keeps the peak."""

    def __init__(self, start: int):
        super().__init__()
        self.live, self.now, self.peak = set(), start, start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                self.live.add(key)
                self.now += size
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.now -= size


@pytest.mark.parametrize(("side", "patch", "depth", "dim", "batch"), [
    (32, 4, 2, 128, 16),   # channel mixing dominates
    (64, 4, 2, 64, 8),     # 256 patches: token mixing and the residual stream count
    (32, 16, 2, 128, 32),  # 4 patches: the token MLP's hidden layer (C × D_S) is the widest
])
def test_the_estimate_is_the_peak_of_the_tensors_a_training_step_holds(side, patch, depth, dim, batch):
    torch.manual_seed(0)
    model = one_config(side, patch, depth, dim)
    weights = sum(p.numel() for p in model.parameters()) * 4
    with LiveTensors(weights) as tensors:
        train_steps(model, batch)
    estimate = training_memory(model.config, batch)
    assert 1.0 <= estimate / tensors.peak <= 1.15, (estimate / MiB, tensors.peak / MiB)  # a bound, and a close one


def measured_peak_rss(side: int, patch: int, depth: int, dim: int, batch: int) -> int:
    """Peak resident memory growth of two training steps, in a forked child (no second torch import).

    The peak is reset (clear_refs 5) once the child is warm: ru_maxrss would count the peak the child
    inherited from a long-running pytest worker, which made this measure depend on the tests before it.

    The child first warms up on a tiny model, so the library code its first ops page in is not
    counted, and hands freed heap back (malloc_trim), so the parent's free memory is not reused unseen.
    It runs with the CLI's allocator settings (pipeline.allocator), as training does.
    """
    from pipeline.allocator import keep_freed_memory

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            keep_freed_memory()
            train_steps(one_config(8, 4, 1, 8), 2, steps=1)
            ctypes.CDLL(None).malloc_trim(0)
            with open("/proc/self/statm") as f:
                before = int(f.read().split()[1]) * resource.getpagesize()
            with open("/proc/self/clear_refs", "w") as f:  # the peak so far (the forked parent's pages) is not ours
                f.write("5")
            train_steps(one_config(side, patch, depth, dim), batch)
            with open("/proc/self/status") as f:
                peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
            os.write(write, str(peak - before).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and text, "the measuring child failed"
    return int(text)


def test_the_estimate_is_within_2x_of_the_measured_peak_memory_and_the_check_covers_it():
    measured = measured_peak_rss(32, 4, 2, 256, 24)
    c = one_config(32, 4, 2, 256).config
    estimate = training_memory(c, 24)
    assert 0.5 <= estimate / measured <= 2, (estimate / MiB, measured / MiB)  # here: ~0.82
    assert resources._with_slack(estimate) >= measured  # what the check compares with the free memory


@pytest.fixture
def project(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "images", {"a": 4, "b": 4}, size=(8, 8))
    write_params(tmp_path / "params.yaml", data=str(tmp_path / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=2, val_fraction=0.25)  # 0.25: each class of 4 gives val an image
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_refuses_a_batch_that_cannot_fit_and_says_what_would(project):
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert runner.invoke(app, ["check"]).exit_code == 0
    result = runner.invoke(app, ["check", "--variant", "H/14", "--image-shape", "448", "448",
                                 "--batch-size", "4096"])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert line.startswith("error: batch_size 4096 with variant H/14, image_shape [448, 448] needs about ")
    assert "TiB of memory to train, but " in line and "lower batch_size to at most " in line and "\n" not in line


@pytest.mark.parametrize("command", [["train", "--no-progress"], ["bench", "--config", "default", "--steps", "1"]])
def test_train_and_bench_refuse_a_model_that_cannot_fit_before_building_it(project, command):
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert runner.invoke(app, ["prepare", "--workers", "1"]).exit_code == 0
    # 2^17 channels: petabytes of weights, so building the model first would fail (or take) far worse
    write_params(project / "params.yaml", data=str(project / "images"), image_shape=[8, 8], patch_shape=[2, 2],
                 num_classes=2, dim=1 << 17)
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: batch_size 64 with depth 4, dim 131072, image_shape [8, 8] needs about ")
    assert "even batch_size 1 does not fit" in result.output


def test_the_check_allows_what_fits_and_suggests_a_batch_that_does(monkeypatch):
    c = MixerConfig(image_shape=(224, 224), num_classes=1000, **variant_fields("B/16"))
    monkeypatch.setattr(resources, "available_memory", lambda device=None: (16 << 30, "RAM"))
    with pytest.raises(MixerError, match="lower batch_size to at most ([0-9]+)") as caught:
        resources.check_training_memory(c, 1024, variant="B/16")
    fits = int(caught.value.args[0].rsplit(" ", 1)[1])
    resources.check_training_memory(c, fits, variant="B/16")  # the suggestion fits
    with pytest.raises(MixerError):
        resources.check_training_memory(c, fits + 1, variant="B/16")
    with pytest.raises(MixerError, match=r"needs about .* per process × 4 of memory"):
        resources.check_training_memory(c, fits, variant="B/16", processes=4)  # four ranks share this RAM


# ---- disk: prepare -----------------------------------------------------------------------------

def test_prepare_refuses_a_data_set_the_disk_cannot_hold_and_keeps_what_was_there(project, monkeypatch):
    from pipeline import prepare

    prepare.run(project / "params.yaml", {}, workers=1)
    images = (project / "prepared" / "images.npy").read_bytes()
    written = sum(p.stat().st_size for p in (project / "prepared").iterdir())
    assert written <= prepared_bytes(8, (8, 8))  # the estimate covers what prepare writes
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(*real(path)[:2], 2 * MiB))
    with pytest.raises(MixerError, match=r"^prepare: 8 images at image_shape \[512, 512\] "
                                         r"\(8 × 512 × 512 × 3 bytes\) "
                                         r"needs 7\.0 MiB but .* has 2\.0 MiB free; free disk space, or choose"):
        prepare.run(project / "params.yaml", {"image_shape": (512, 512)}, workers=1)
    assert (project / "prepared" / "images.npy").read_bytes() == images


# ---- downloads ---------------------------------------------------------------------------------

@contextmanager
def serving(handler):
    """A local HTTP server on 127.0.0.1 whose GET is `handler(request)`; yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            handler(self)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_download_larger_than_the_limit_is_refused_before_and_while_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXER_MAX_DOWNLOAD", "1000")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "big.npz").write_bytes(b"x" * 5000)
    server = _Server(tmp_path / "site")
    try:  # an honest Content-Length: refused before reading
        with pytest.raises(MixerError, match=r"big\.npz: it is 5000 bytes, more than "
                                             r"MIXER_MAX_DOWNLOAD \(1000 bytes\); raise"):
            download(f"{server.url}/big.npz")
    finally:
        server.close()

    def no_length(request):  # no Content-Length at all: the body ends when the connection does
        request.send_response(200)
        request.send_header("Connection", "close")
        request.end_headers()
        request.wfile.write(b"x" * 5000)

    with serving(no_length) as url:
        with pytest.raises(MixerError, match="the server sent more than MIXER_MAX_DOWNLOAD"):
            download(f"{url}/lying.npz")
    assert not cached_files(tmp_path / "cache")


def test_a_download_that_drips_meets_the_time_limit(tmp_path, monkeypatch):
    """The download's clock is the test's: 100 s pass at each reading, and the server sends its next 20 bytes
    only once the client has read the clock after the last ones, so each read brings one drip."""
    import mixer.pretrained as pretrained

    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MIXER_DOWNLOAD_TIME_LIMIT", "300")  # also each read's real timeout: a failsafe only
    readings, read, finished = [], threading.Event(), threading.Event()

    def clock():
        readings.append(100.0 * len(readings))
        read.set()
        return readings[-1]

    monkeypatch.setattr(pretrained, "time", SimpleNamespace(monotonic=clock))

    def drip(request):  # 1000 bytes announced, 20 at a time
        read.clear()  # the reading that set the deadline came before the request
        request.send_response(200)
        request.send_header("Content-Length", "1000")
        request.end_headers()
        for _ in range(50):
            request.wfile.write(b"x" * 20)
            request.wfile.flush()
            read.wait(timeout=60)
            if finished.is_set():
                return
            read.clear()

    with serving(drip) as url:
        try:
            # the deadline is the first reading (0) + 300: the fourth drip's reading (400) is past it
            with pytest.raises(MixerError, match=r"/slow\.npz: not complete after 300 s \(80 bytes\); raise "
                                                 "MIXER_DOWNLOAD_TIME_LIMIT"):
                download(f"{url}/slow.npz")
        finally:
            finished.set()
            read.set()
    assert readings == [0.0, 100.0, 200.0, 300.0, 400.0]  # at 300, not past the deadline: the download went on
    assert not cached_files(tmp_path / "cache")
    monkeypatch.setenv("MIXER_DOWNLOAD_TIME_LIMIT", "soon")
    with pytest.raises(MixerError, match="MIXER_DOWNLOAD_TIME_LIMIT must be a positive number of seconds up to 1e7, got 'soon'"):
        download("http://127.0.0.1:9/x.npz")


def test_a_download_larger_than_the_free_disk_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "w.npz").write_bytes(b"x" * 300_000)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(*real(path)[:2], 150_000))
    server = _Server(tmp_path / "site")
    try:
        with pytest.raises(MixerError, match=r"^downloading .*/w\.npz needs 0\.3 MiB but .*cache.* has 0\.1 MiB free; "
                                             "free disk space, or point MIXER_CACHE"):
            download(f"{server.url}/w.npz")
    finally:
        server.close()
    assert not cached_files(tmp_path / "cache")


# ---- .npz headers ------------------------------------------------------------------------------

def npz_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for (name, data) in members.items():
            archive.writestr(name, data)
    return path


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()  # the magic string, then the header


def test_an_npz_declaring_a_huge_array_is_one_line_not_an_out_of_memory(tmp_path):
    bomb = npz_with(tmp_path / "bomb.npz", {"stem/kernel.npy": npy_header((10**6, 10**6), "<f4") + b"\0" * 64})
    assert bomb.stat().st_size < 1000
    with pytest.raises(MixerError, match=r"bomb\.npz is not a readable weights file \(stem/kernel declares shape "
                                         r"\[1000000, 1000000\] of float32, 4000000000000 bytes, but holds 64\)"):
        read_tensors(bomb)


def test_an_npz_whose_arrays_are_absurd_or_do_not_fit_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.npz"
    np.savez_compressed(path, a=np.zeros((1000, 1000), np.float32), b=np.zeros(10, np.float16))
    assert set(read_tensors(path)) == {"a", "b"}  # a sound archive reads
    monkeypatch.setattr(resources, "available_memory", lambda device=None: (1 << 20, "RAM"))
    with pytest.raises(MixerError, match=r"big\.npz needs 7\.6 MiB of memory to read but 1\.0 MiB is available"):
        read_tensors(path)
    monkeypatch.setattr(resources, "MAX_NPZ_ELEMENTS", 10**5)
    with pytest.raises(MixerError, match=r"big\.npz declares 1000010 values, more than any MLP-Mixer has"):
        read_tensors(path)


@pytest.mark.parametrize(("members", "message"), [
    ({"a.npy": npy_header((3,), "<U10") + b"\0" * 120}, r"\(a has dtype <U10, not numbers\)"),
    ({"a.npy": npy_header((3,), "|O") + b"\0" * 24}, r"\(Object arrays cannot be loaded: a holds Python objects"),
    ({"a.npy": npy_header((2,), "<f4") + b"\0" * 8, "notes.txt": b"\0" * 100},
     r"\(member 'notes\.txt' is not a \.npy array\)"),
    ({"a.npy": b"not an npy file at all"}, r"is not a readable weights file \("),
])
def test_an_npz_member_that_is_not_numbers_is_refused_by_its_header(tmp_path, members, message):
    with pytest.raises(MixerError, match=message):
        read_tensors(npz_with(tmp_path / "odd.npz", members))


# ---- a full disk ---------------------------------------------------------------------------------

def test_a_full_disk_while_writing_staged_outputs_is_one_line_and_keeps_the_old_ones(project, monkeypatch):
    import mixer.data
    from pipeline import prepare

    prepare.run(project / "params.yaml", {}, workers=1)
    before = {p.name: p.read_bytes() for p in (project / "prepared").iterdir()}

    def full(table, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(mixer.data, "write_csv", full)
    with pytest.raises(MixerError, match=r"^cannot write .*manifest\.csv.*: No space left on device"):
        prepare.run(project / "params.yaml", {"seed": 1}, workers=1)
    assert {p.name: p.read_bytes() for p in (project / "prepared").iterdir()} == before
    assert not [p for p in project.iterdir() if p.name.endswith(".partial")]  # no staging left behind


def test_a_full_disk_without_a_file_name_still_names_the_output(project, monkeypatch):
    import mixer.data
    from pipeline import prepare

    def full(table, target, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # what a plain file write raises

    monkeypatch.setattr(mixer.data, "write_csv", full)
    with pytest.raises(MixerError, match=r"^cannot write prepared\b.*: No space left on device"):
        prepare.run(project / "params.yaml", {}, workers=1)
