"""The hub path has one deadline: a hub that refuses, never answers, answers with errors or drips its file
ends the command with one line that says why and what to do, without huggingface_hub's retries (or
their "Retrying in 8s" lines), and a cached model still loads. Every server here is on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_pretrained import hub  # noqa: F401  (the fixture: a hub cache holding someone/mixer-tiny)

LIMIT = 3  # MIXER_DOWNLOAD_TIME_LIMIT for these runs, in seconds
HANG = 120  # a run still going after this long hangs: far above LIMIT plus a process's start


def closed_port() -> int:
    with socket.socket() as s:  # bound, then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Silent:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:  # closed
                return

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


class Answering:
    """A hub endpoint: `kind` 'error' answers every request with HTTP 503; 'drip' answers a file's metadata
    (a commit, an ETag, a size) and then sends its body a byte every half second, forever."""

    def __init__(self, kind: str):
        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self) -> bool:
                if kind == "error" or "/resolve/" not in self.path:
                    self.send_response(503 if kind == "error" else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return False
                self.send_response(200)
                for (k, v) in (("X-Repo-Commit", "c" * 40), ("ETag", '"0123abcd"'), ("Content-Length", "100000")):
                    self.send_header(k, v)
                self.end_headers()
                return True

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                if self._head():
                    try:
                        while not stop.wait(0.5):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                    except OSError:  # the client gave up
                        pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def mixer(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (huggingface_hub reads HF_ENDPOINT and proxies at import), online, no proxy
    unless given."""
    base = {k: v for (k, v) in os.environ.items() if not k.lower().endswith("_proxy")}
    full = {**base, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "MIXER_DOWNLOAD_TIME_LIMIT": str(LIMIT),
            "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *args], cwd=cwd,
                          env=full, capture_output=True, text=True, timeout=HANG)


@pytest.fixture
def endpoint(request):
    """(the environment that points the hub at a server of the kind the test names, the server's URL)."""
    kind = request.param
    if kind == "closed":
        url = f"http://127.0.0.1:{closed_port()}"
        yield {"HF_ENDPOINT": url}, url
    elif kind == "refusing proxy":
        url, proxy = f"https://127.0.0.1:{closed_port()}", f"http://127.0.0.1:{closed_port()}"
        yield {"HF_ENDPOINT": url, "HTTPS_PROXY": proxy}, proxy
    else:
        server = Silent() if kind == "silent" else Answering(kind)
        try:
            yield {"HF_ENDPOINT": server.url}, server.url
        finally:
            server.close()


IMPORT, CHECK = ["import-weights", "hf-hub:someone/absent", "out"], ["check", "--checkpoint", "hf-hub:someone/absent"]


@pytest.mark.timeout(2 * HANG)
@pytest.mark.parametrize(("endpoint", "command", "says"), [
    pytest.param("silent", IMPORT, "not in the local hub cache and cannot be downloaded (no answer from {url} within ",
                 id="silent"),
    pytest.param("silent", CHECK, "not in the local hub cache and cannot be downloaded (no answer from {url} within ",
                 id="silent-check"),
    pytest.param("refusing proxy", IMPORT, "not in the local hub cache and cannot be downloaded (cannot connect to "
                                           "the proxy {url}: ", id="refusing-proxy"),
    pytest.param("refusing proxy", CHECK, "not in the local hub cache and cannot be downloaded (cannot connect to "
                                          "the proxy {url}: ", id="refusing-proxy-check"),
    pytest.param("error", IMPORT, "not in the local hub cache and cannot be downloaded ({url} answered HTTP 503)",
                 id="server-error"),
    pytest.param("drip", IMPORT, "model.safetensors not downloaded from {url} within 3 s; check the network, or "
                                 "raise MIXER_DOWNLOAD_TIME_LIMIT", id="drip"),
    pytest.param("closed", IMPORT, "not in the local hub cache and cannot be downloaded (no connection to {url})",
                 id="closed-port"),
], indirect=["endpoint"])
def test_a_hub_that_cannot_serve_the_model_is_one_line_saying_why_within_the_deadline(tmp_path, endpoint, command,
                                                                                      says):
    (env, url) = endpoint
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())  # for `mixer check`
    started = time.monotonic()
    result = mixer(command, tmp_path, HF_HOME=str(tmp_path / "hf"), **env)
    assert result.returncode == 2, (time.monotonic() - started, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert says.format(url=url) in result.stderr, result.stderr
    if "cannot be downloaded" in says and "(no connection to" not in says:
        assert "check the network, HF_ENDPOINT and HTTPS_PROXY" in result.stderr
    assert "Retrying" not in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.timeout(2 * HANG)
@pytest.mark.parametrize("endpoint", ["silent", "error"], indirect=True)
def test_a_cached_model_loads_when_the_hub_does_not_answer(hub, tmp_path, endpoint):  # noqa: F811
    (env, _) = endpoint
    result = mixer(["import-weights", "hf-hub:someone/mixer-tiny", "out"], tmp_path, HF_HOME=str(hub), **env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file() and "Retrying" not in result.stderr, result.stderr
