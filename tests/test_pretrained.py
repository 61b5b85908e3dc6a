"""Pretrained weights from the hub (an offline cache in huggingface_hub's layout) and from URLs (a
local HTTP server): the right weights, the hub's input size and normalisation, and provenance."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import HANG, ROOT
from mixer.checkpoint import load_model
from reference import as_flax, as_timm, mixer_forward, random_weights

COMMIT = "a" * 40
OTHER = "b" * 40
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def timm_weights(seed: int) -> dict:
    """A timm-layout Mixer for 16x20 images in 4x4 patches: a 4x5 grid, which is not square, so the
    architecture cannot be inferred from the tensors alone: only the hub's input_size gives it."""
    return random_weights(3, (4, 4), 20, 16, 8, 32, 2, 3, seed=seed)


def add_snapshot(hf_home: Path, repo: str, commit: str, weights: dict, ref: str | None = "main") -> Path:
    """One revision of `repo` in the layout huggingface_hub reads offline (files kept in the snapshot)."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for (k, v) in as_timm(weights).items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": "mixer_tiny", "num_classes": 3, "label_names": ["ant", "bee", "cat"],
        "pretrained_cfg": {"input_size": [3, 16, 20], "mean": MEAN, "std": STD, "interpolation": "bicubic"}}))
    if ref is not None:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path) -> Path:
    hf_home = tmp_path / "hf"
    add_snapshot(hf_home, "someone/mixer-tiny", COMMIT, timm_weights(0))
    add_snapshot(hf_home, "someone/mixer-tiny", OTHER, timm_weights(1), ref=None)
    return hf_home


def mixer(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *args], cwd=cwd,
                          env={**full, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=HANG)


def logits_match(model_dir: Path, weights: dict) -> bool:
    x = torch.randn(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = load_model(model_dir)(x)
    return (ours - mixer_forward(x, weights, (4, 4), "exact")).abs().max().item() <= 2e-5


def test_a_model_directorys_weights_file_loads_with_its_config(tmp_path):
    """`checkpoint: output/model.safetensors` fine-tunes from the model itself: its classes, normalisation,
    and an input size that a 2x4 patch grid (not square) could not give."""
    from mixer.checkpoint import save_model, sha256_file
    from mixer.model import create_model
    from mixer.preprocess import Preprocessing
    from mixer.pretrained import load_pretrained, pretrained_config

    model = create_model(image_shape=(8, 16), patch_shape=(4, 4), depth=1, dim=8, num_classes=3)
    model.class_names, model.preprocessing = ["ant", "bee", "cat"], Preprocessing(mean=MEAN, std=STD)
    save_model(model, tmp_path / "m")
    weights = str(tmp_path / "m" / "model.safetensors")
    loaded = load_pretrained(weights)
    assert (loaded.config, loaded.class_names, loaded.preprocessing) == (model.config, model.class_names,
                                                                        model.preprocessing)
    assert loaded.source == {"path": weights, "sha256": sha256_file(Path(weights))}
    assert pretrained_config(weights) == model.config
    for (k, v) in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_import_from_an_offline_hub_cache_takes_the_repos_config_and_records_its_source(hub, tmp_path):
    result = mixer(["import-weights", "hf-hub:someone/mixer-tiny", "out"], tmp_path, HF_HOME=str(hub))
    assert result.returncode == 0, result.stderr
    assert logits_match(tmp_path / "out", timm_weights(0)) and not logits_match(tmp_path / "out", timm_weights(1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"]["image_shape"] == [16, 20]  # from pretrained_cfg: a 4x5 grid is not square
    assert config["preprocessing"]["mean"] == MEAN and config["preprocessing"]["std"] == STD
    assert config["class_names"] == ["ant", "bee", "cat"]
    weights = hub / "hub" / "models--someone--mixer-tiny" / "snapshots" / COMMIT / "model.safetensors"
    assert config["source"] == {"hub": "someone/mixer-tiny", "revision": COMMIT, "file": "model.safetensors",
                                "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def test_a_revision_picks_that_snapshot(hub, tmp_path):
    result = mixer(["import-weights", f"hf-hub:someone/mixer-tiny@{OTHER}", "out"], tmp_path, HF_HOME=str(hub))
    assert result.returncode == 0, result.stderr
    assert logits_match(tmp_path / "out", timm_weights(1)) and not logits_match(tmp_path / "out", timm_weights(0))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["source"]["revision"] == OTHER


def test_predict_takes_a_hub_model_and_agrees_with_its_imported_copy(hub, tmp_path):
    from conftest import make_image_folder

    make_image_folder(tmp_path / "photos", {"x": 4}, size=(20, 16))
    assert mixer(["import-weights", "hf-hub:someone/mixer-tiny", "out"], tmp_path, HF_HOME=str(hub)).returncode == 0
    runs = [mixer(["predict", "photos", "--model", spec, "--out", f"{name}.csv", "--workers", "1"], tmp_path,
                  HF_HOME=str(hub)) for (name, spec) in (("hub", "hf-hub:someone/mixer-tiny"), ("dir", "out"))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    hub_table, dir_table = (pd.read_csv(tmp_path / f"{name}.csv") for name in ("hub", "dir"))
    assert len(hub_table) == 4 and set(hub_table["label_1"]) <= {"ant", "bee", "cat"}
    pd.testing.assert_frame_equal(hub_table, dir_table)


@pytest.mark.parametrize(("spec", "message"), [
    ("hf-hub:someone/absent", "hf-hub:someone/absent: not in the local hub cache and cannot be downloaded "
                              "(HF_HUB_OFFLINE is set)"),
    ("hf-hub:someone/mixer-tiny@" + "c" * 40, "not in the local hub cache"),
    ("hf-hub:no-slash", "is not hf-hub:owner/name or hf-hub:owner/name@revision"),
    ("hf-hub:someone/mixer-tiny@", "is not hf-hub:owner/name"),
])
def test_hub_problems_are_one_line(hub, tmp_path, spec, message):
    result = mixer(["import-weights", spec, "out"], tmp_path, HF_HOME=str(hub))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


class _Server:
    """A local HTTP server over `folder` that counts the requests it answers."""

    def __init__(self, folder: Path):
        self.requests = 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_url_is_downloaded_once_into_the_cache_and_checked(tmp_path, monkeypatch):
    from mixer.errors import MixerError
    from mixer.pretrained import import_weights

    weights = random_weights(3, (4, 4), 16, 16, 8, 32, 2, 3, seed=2)
    (tmp_path / "site").mkdir()
    np.savez(tmp_path / "site" / "mixer.npz", **as_flax(weights))
    digest = hashlib.sha256((tmp_path / "site" / "mixer.npz").read_bytes()).hexdigest()
    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    server = _Server(tmp_path / "site")
    try:
        with pytest.raises(MixerError, match=f"sha256 {digest} is not the {'0' * 64} the URL asks for"):
            import_weights(f"{server.url}/mixer.npz#sha256={'0' * 64}", tmp_path / "bad")
        import_weights(f"{server.url}/mixer.npz#sha256={digest}", tmp_path / "first")
        assert server.requests == 2  # the rejected download was not kept
        with pytest.raises(MixerError, match="cannot download .*/absent.npz"):
            import_weights(f"{server.url}/absent.npz", tmp_path / "absent")
        url = f"{server.url}/mixer.npz"
    finally:
        server.close()
    model = import_weights(url, tmp_path / "again")  # the server is gone: the cache answers
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert (model.eval()(x) - mixer_forward(x, weights, (4, 4), "tanh")).abs().max().item() <= 2e-5
    assert json.loads((tmp_path / "again" / "config.json").read_text())["source"] == {"url": url, "sha256": digest}
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["mixer.npz"]


def test_a_cut_download_never_enters_the_cache_and_a_wrong_checksum_keeps_a_good_file(tmp_path, monkeypatch):
    from mixer.errors import MixerError
    from mixer.pretrained import download

    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"x" * 102)  # then the connection closes

        def log_message(self, *args):
            pass

    monkeypatch.setenv("MIXER_CACHE", str(tmp_path / "cache"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(MixerError, match="the connection ended after 102 of 100000 bytes"):
            download(f"http://127.0.0.1:{httpd.server_port}/w.npz")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    for bad in ("https://exa mple.com/x.npz", "https://example.com:abc/x.npz", "https://[::1/x.npz"):
        with pytest.raises(MixerError, match="not a valid URL|cannot download"):
            download(bad)

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "w.npz").write_bytes(b"weights")
    server = _Server(tmp_path / "site")
    try:
        path, _ = download(f"{server.url}/w.npz")
        with pytest.raises(MixerError, match=f"delete {path} to download it again"):
            download(f"{server.url}/w.npz#sha256={'0' * 64}")  # a typo in the checksum
    finally:
        server.close()
    assert path.read_bytes() == b"weights"  # the good file is kept


def test_without_a_network_the_hub_cache_alone_answers_after_one_short_attempt(hub, tmp_path):
    """HF_HUB_OFFLINE unset and the hub unreachable (its endpoint a closed local port): a cached model
    loads, one that is not is one line saying there is no connection, without huggingface_hub's
    retries; the attempt is made once a process."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}
    cached = mixer(["import-weights", "hf-hub:someone/mixer-tiny", "out"], tmp_path, **env)
    assert cached.returncode == 0, cached.stderr
    absent = mixer(["import-weights", "hf-hub:someone/absent", "out2"], tmp_path, **env)
    assert absent.returncode == 2 and absent.stderr.count("\n") == 1, absent.stderr
    assert f"hf-hub:someone/absent: not in the local hub cache and cannot be downloaded (no connection to " \
           f"{endpoint})" in absent.stderr
    assert "Retrying" not in absent.stderr and "Traceback" not in absent.stderr


def test_the_reachability_attempt_is_made_once_and_a_proxy_counts_as_reachable(monkeypatch):
    from mixer import pretrained

    attempts = []

    def refuse(address, timeout):
        attempts.append((address, timeout))
        raise OSError("refused")

    monkeypatch.setattr(pretrained.socket, "create_connection", refuse)
    for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    pretrained.hub_reachable.cache_clear()
    assert pretrained.hub_reachable() is False and pretrained.hub_reachable() is False
    assert len(attempts) == 1 and attempts[0][1] == 3.0
    pretrained.hub_reachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert pretrained.hub_reachable() is True and len(attempts) == 1
    pretrained.hub_reachable.cache_clear()
