"""Pretrained weights from where people keep them: a model directory, a weights file, the Hugging Face
Hub (`hf-hub:owner/name[@revision]`, through `huggingface_hub` and its cache) or an `https://` URL
(downloaded once into a cache). Each becomes an `MlpMixer` whose `source` records where it came
from: the hub repository and the commit it resolved to, or the path or URL, and the file's sha256.

A hub repository in timm's layout (`config.json` + `model.safetensors`) also says the input size and
normalisation its weights were trained with (`pretrained_cfg`): the model takes both, so a user
names only the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mixer.checkpoint import CONFIG, FORMAT, WEIGHTS, convert_weights, describe, load_model, save_model, sha256_file
from mixer.errors import MixerError
from mixer.files import atomic_write
from mixer.model import MixerConfig, MlpMixer, at_image_shape, check_class_names
from mixer.preprocess import Preprocessing
from mixer.resources import check_disk, check_expansion_memory, format_bytes

HUB = "hf-hub:"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # timm's files, preferred first
MAX_DOWNLOAD = 4 << 30  # bytes: far above any Mixer (H/14 is 1.9 GB), far below a mistaken URL
DOWNLOAD_TIME_LIMIT = 3600.0  # seconds for a whole download (a URL's, or a hub model's files)
T = TypeVar("T")


def is_remote(spec: str) -> bool:
    return spec.startswith((HUB, "https://", "http://"))


def cache_dir() -> Path:
    """Where URL downloads are kept: $MIXER_CACHE, else ~/.cache/mlp-mixer (hub files go to huggingface_hub's
    own cache, $HF_HOME)."""
    return Path(os.environ.get("MIXER_CACHE") or Path.home() / ".cache" / "mlp-mixer")


def load_pretrained(spec: str, image_shape: tuple[int, int] | None = None) -> MlpMixer:
    """The model `spec` names, with `model.source` set (see the module docstring).

    image_shape: the input size to load it at (None: the weights' own). The weights' own size (which
    also tells a bare weights file's non-square grid; a hub repository's `pretrained_cfg` and a model
    directory say it themselves) or a whole multiple of it per side, to which the token-mixing weights
    are expanded (`mixer.model.at_image_shape`, the paper's fine-tuning at a higher resolution) once
    `mixer.resources.check_expansion_memory` finds the memory to build them.
    """
    spec = str(spec)
    model = _load(spec, image_shape)
    if image_shape is None:
        return model
    try:
        check_expansion_memory(model.config, tuple(image_shape))  # the token-mixing weights grow as K²
        return at_image_shape(model, tuple(image_shape))
    except MixerError as exc:
        raise MixerError(f"{spec}: {exc}") from None


def _load(spec: str, image_shape: tuple[int, int] | None) -> MlpMixer:
    if spec.startswith(HUB):
        return _from_hub(spec, image_shape)
    if spec.startswith(("https://", "http://")):
        path, source = download(spec)
        return _converted(path, source, image_shape)
    path = Path(spec)
    folder = model_directory(spec)
    if folder is not None:  # its config.json has the class names and normalisation; bare weights have neither
        model = load_model(folder).train()
        model.source = {"path": spec, "sha256": sha256_file(folder / WEIGHTS)}
        if isinstance(model.meta.get("source"), dict):
            model.source["from"] = model.meta["source"]
        return model
    return _converted(path, {"path": spec}, image_shape)


def model_directory(spec: str) -> Path | None:
    """The model directory `spec` names: a folder with a config.json, or the folder of a `model.safetensors`
    beside this project's config.json (format mlp-mixer); None for anything else (weights from elsewhere)."""
    if is_remote(spec):
        return None
    path = Path(spec)
    if path.is_dir():
        return path if (path / CONFIG).exists() else None
    if path.name != WEIGHTS or not path.is_file():  # another file beside a config.json is not what it describes
        return None
    try:
        meta = json.loads((path.parent / CONFIG).read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # none, or not JSON: not a model directory's config
        return None
    # only the format decides: a damaged config of ours is then an error from load_model, not silently ignored
    return path.parent if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def import_weights(spec: str, out_dir: Path, image_shape: tuple[int, int] | None = None) -> MlpMixer:
    """`load_pretrained(spec)` written as a model directory, with its source in `config.json`; a model of this
    project keeps its record of the data it was trained on and of which epoch it is (evaluate checks the one)."""
    model = load_pretrained(spec, image_shape)
    meta = getattr(model, "meta", None) or {}
    save_model(model, Path(out_dir), source=model.source, trained_on=meta.get("trained_on"), kept=meta.get("kept"))
    return model


def pretrained_config(spec: str) -> MixerConfig:
    """The architecture `spec` holds (a model directory is only read, not loaded)."""
    folder = model_directory(spec)
    if folder is not None:
        return describe(folder)[0]
    return load_pretrained(spec).config


def _converted(path: Path, source: dict, image_shape: tuple[int, int] | None = None,
               preprocessing: Preprocessing | None = None, class_names: list[str] | None = None) -> MlpMixer:
    model = convert_weights(path, image_shape)
    if preprocessing is not None:
        model.preprocessing = preprocessing
    if isinstance(class_names, list) and len(class_names) == model.config.num_classes:
        model.class_names = check_class_names(class_names, model.config.num_classes)
    model.source = {**source, "sha256": sha256_file(path)}
    return model


# ---- the Hugging Face Hub -------------------------------------------------------------------------

def parse_hub(spec: str) -> tuple[str, str | None]:
    """'hf-hub:owner/name@rev' → ('owner/name', 'rev'); revision None means the repository's main."""
    repo, _, revision = spec[len(HUB):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (_ and not revision):
        raise MixerError(f"checkpoint {spec!r} is not {HUB}owner/name or {HUB}owner/name@revision")
    return repo, revision or None


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """One short attempt to connect to the hub's host (once per process). Behind a proxy the answer is yes:
    the proxy, not this machine, reaches the hub."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlsplit(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


class _NotCached(MixerError):
    """A hub file that is neither in the local cache nor downloadable now."""


NETWORK_ADVICE = ("check the network, HF_ENDPOINT and HTTPS_PROXY, or point HF_HOME at a hub cache that has it "
                  "(HF_HUB_OFFLINE=1 then reads only the cache)")
HUB_THREAD = "mixer-hub-fetch"  # the name of the threads `_before` runs hub calls in


class _Late(Exception):
    """A hub call still running at its fetch's deadline."""


def _before(deadline: float, call: Callable[[], T]) -> T:
    """`call()` run in a daemon thread and waited for until `deadline` (time.monotonic()): past it `_Late`,
    and the thread is left to end on its own (it does not keep the process alive). huggingface_hub's
    own timeouts bound each request, not its retries and resumes: this bounds them all."""
    outcome: list[tuple[bool, object]] = []

    def work() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed over: the waiting thread raises it
            outcome.append((False, exc))
        finally:
            _HUSH.release()

    _HUSH.hold()  # until the call ends, however long after the deadline: a retry it logs then stays quiet too
    worker = threading.Thread(target=work, name=HUB_THREAD, daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise _Late()
    (returned, value) = outcome[0]
    if not returned:
        raise value
    return value


class _Hush:
    """huggingface_hub's log held at ERROR while anything of ours uses the hub (each retry logs a warning,
    "Retrying in 8s": what went wrong is our one line), and given back its own level once nothing does."""

    def __init__(self):
        self.lock, self.users, self.level = threading.Lock(), 0, logging.NOTSET

    def hold(self) -> None:
        with self.lock:
            logger = logging.getLogger("huggingface_hub")
            if self.users == 0:
                self.level = logger.level
                logger.setLevel(logging.ERROR)
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                logging.getLogger("huggingface_hub").setLevel(self.level)


_HUSH = _Hush()


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub quiet while a fetch runs (and while any call it gave up on still runs: see `_Hush`)."""
    _HUSH.hold()
    try:
        yield
    finally:
        _HUSH.release()


def hub_proxy() -> str | None:
    """The proxy requests to the hub go through (HTTPS_PROXY, ALL_PROXY, ... less NO_PROXY); None: direct."""
    url = urllib.parse.urlsplit(hub_endpoint())
    proxies = urllib.request.getproxies_environment()
    if urllib.request.proxy_bypass_environment(url.hostname or "", proxies):
        return None
    return proxies.get(url.scheme) or proxies.get("all")


@dataclasses.dataclass
class _HubFetch:
    """One spec's files from the hub: one deadline for all of them ($MIXER_DOWNLOAD_TIME_LIMIT, as a URL's
    download), and why the hub cannot be used now once a first request found out ('' while it can)."""

    seconds: float
    deadline: float
    down: str | None = None  # None: not asked yet

    @classmethod
    def start(cls) -> "_HubFetch":
        seconds = _env_number("MIXER_DOWNLOAD_TIME_LIMIT", DOWNLOAD_TIME_LIMIT)
        return cls(seconds, time.monotonic() + seconds)

    def probe(self, repo: str, revision: str | None) -> str:
        """Ask the hub once, without retries, for the first weights file's metadata: '' when it answers
        (any answer but a server error: a missing repository is huggingface_hub's to word), else why not."""
        if self.down is None:
            self.down = self._ask(repo, revision)
        return self.down

    def _ask(self, repo: str, revision: str | None) -> str:
        import httpx2  # huggingface_hub's HTTP client: its errors are what a request raises
        from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url

        endpoint, proxy = hub_endpoint(), hub_proxy()
        timeout = max(0.1, min(float(constants.HF_HUB_ETAG_TIMEOUT), self.deadline - time.monotonic()))
        late = f"no answer from {endpoint}" + (f" through the proxy {proxy}" if proxy else "") + \
            f" within {timeout:.3g} s"
        try:
            # a hung name lookup is not bounded by the request's timeout: the probe waits twice that at most
            _before(min(self.deadline, time.monotonic() + 2 * timeout + 1), lambda: get_hf_file_metadata(hf_hub_url(repo, HUB_WEIGHTS[0], revision=revision),
                                                                timeout=timeout))
        except errors.HFValidationError:  # not a repository name at all: the download below says so in one line
            return ""
        except errors.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            return f"{endpoint} answered HTTP {status}" if status is not None and (status >= 500 or status == 429) \
                else ""
        except (_Late, httpx2.TimeoutException):
            return late
        except httpx2.ProxyError as exc:
            return f"the proxy {proxy} did not open a connection to {endpoint}: {_first_line(exc)}"
        except httpx2.ConnectError as exc:
            return f"cannot connect to the proxy {proxy}: {_first_line(exc)}" if proxy else \
                f"cannot connect to {endpoint}: {_first_line(exc)}"
        except httpx2.TransportError as exc:
            return f"{endpoint}: {_first_line(exc)}"
        return ""


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hub_file(repo: str, filename: str, revision: str | None, fetch: _HubFetch) -> Path | None:
    """One file of a hub repository, from huggingface_hub's cache or the network; None if the repo lacks it.

    Without a network (HF_HUB_OFFLINE, no connection, or no good answer to `fetch.probe`) the cache alone:
    huggingface_hub would otherwise retry for minutes. A download is bounded by `fetch`'s deadline."""
    from huggingface_hub import errors, hf_hub_download, is_offline_mode

    where = f"{HUB}{repo}" + (f"@{revision}" if revision else "")
    offline = "HF_HUB_OFFLINE is set" if is_offline_mode() else "" if hub_reachable() else \
        f"no connection to {hub_endpoint()}"
    offline = offline or fetch.probe(repo, revision)
    download = functools.partial(hf_hub_download, repo, filename, revision=revision, local_files_only=bool(offline))
    try:
        return Path(download() if offline else _before(fetch.deadline, download))
    except errors.LocalEntryNotFoundError:
        advice = ("download it once with a network (or point HF_HOME at the cache that has it)"
                  if is_offline_mode() else NETWORK_ADVICE)
        raise _NotCached(f"{where}: not in the local hub cache and cannot be downloaded"
                         + (f" ({offline})" if offline else "") + f"; {advice}") from None
    except errors.EntryNotFoundError:
        return None
    except errors.RepositoryNotFoundError:
        raise MixerError(f"{where}: no such repository on the hub (or it is private: log in with "
                         "`hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise MixerError(f"{where}: the repository has no revision {revision!r}") from None
    except errors.HFValidationError as exc:
        raise MixerError(f"{where}: {_first_line(exc)}") from None
    except _Late:
        raise MixerError(f"{where}: {filename} not downloaded from {hub_endpoint()} within {fetch.seconds:g} s; "
                         f"check the network, or raise MIXER_DOWNLOAD_TIME_LIMIT for a slow one") from None
    except Exception as exc:  # HTTP errors, and the HTTP client's own (connection, timeout) after retries
        raise MixerError(f"{where}: cannot download {filename} ({_first_line(exc)}); {NETWORK_ADVICE}") from None


def _hub_files(spec: str, repo: str, revision: str | None, fetch: _HubFetch) -> tuple[Path, Path | None]:
    """The weights file and the config.json (None: it has none) of a hub repository, within `fetch`'s deadline."""
    weights, not_cached = None, None
    for name in HUB_WEIGHTS:  # offline, a file the cached snapshot lacks looks like one not cached
        try:
            weights = _hub_file(repo, name, revision, fetch)
        except _NotCached as exc:
            not_cached = not_cached or exc
        if weights is not None:
            break
    if weights is None:
        raise not_cached or MixerError(f"{spec}: the repository has neither {' nor '.join(HUB_WEIGHTS)}")
    return weights, _hub_file(repo, CONFIG, revision, fetch)  # not cached while the weights are: an error


def _from_hub(spec: str, image_shape: tuple[int, int] | None) -> MlpMixer:
    repo, revision = parse_hub(spec)
    with _quiet_hub():
        weights, config_path = _hub_files(spec, repo, revision, _HubFetch.start())
    timm = _read_json(config_path, spec) if config_path is not None else {}
    pretrained = timm.get("pretrained_cfg") if isinstance(timm.get("pretrained_cfg"), dict) else {}
    size = pretrained.get("input_size")
    if isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size):
        image_shape = (size[1], size[2])  # the weights' own: a size asked for is reached by load_pretrained
    preprocessing = None
    if "mean" in pretrained and "std" in pretrained:
        try:
            preprocessing = Preprocessing(mean=pretrained["mean"], std=pretrained["std"])
        except (MixerError, TypeError) as exc:
            raise MixerError(f"{spec}: {CONFIG}: {exc}") from None
    source = {"hub": repo, "revision": weights.parent.name, "file": weights.name}
    if revision is not None and revision != weights.parent.name:
        source["requested_revision"] = revision
    try:
        return _converted(weights, source, image_shape, preprocessing, timm.get("label_names"))
    except MixerError as exc:
        raise MixerError(f"{spec}: {exc}") from None


def _read_json(path: Path, spec: str) -> dict:
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise MixerError(f"{spec}: {CONFIG} is not readable JSON ({str(exc).splitlines()[0]})") from None
    return value if isinstance(value, dict) else {}


# ---- URLs -----------------------------------------------------------------------------------------

def _env_number(name: str, default: float) -> float:
    """A positive number from the environment variable `name` (unset or empty: `default`)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 1e7:  # beyond it no wait ends (threading refuses longer timeouts): a mistake
        raise MixerError(f"{name} must be a positive number of seconds up to 1e7, got {text[:40]!r}")
    return value


def download(url: str, timeout: float = 60.0, time_limit: float | None = None,
             max_bytes: int | None = None) -> tuple[Path, dict]:
    """A URL's file, fetched once into the cache (keyed by the URL); `#sha256=<hex>` is verified.

    A partial download never enters the cache: it is written beside it, its size checked against
    what the server announced, and renamed when complete. `timeout` bounds each read; `time_limit`
    the whole download ($MIXER_DOWNLOAD_TIME_LIMIT, else an hour) and `max_bytes` its size
    ($MIXER_MAX_DOWNLOAD, else 4 GiB), checked against Content-Length before reading and again
    while reading; a file larger than the cache's free disk is refused before reading.
    """
    try:
        parsed = urllib.parse.urlsplit(url)
        expected = urllib.parse.parse_qs(parsed.fragment).get("sha256", [None])[0]
        plain = urllib.parse.urlunsplit(parsed._replace(fragment=""))
    except ValueError as exc:
        raise MixerError(f"{url} is not a valid URL ({exc})") from None
    name = Path(urllib.parse.unquote(parsed.path)).name or "weights"
    if not name.endswith((".npz", ".safetensors", ".pth", ".pt", ".bin")):
        raise MixerError(f"{url}: the file name must end in .npz, .safetensors, .pth, .pt or .bin")
    folder = cache_dir() / "urls" / hashlib.sha256(plain.encode()).hexdigest()[:24]
    path = folder / name
    fetched = not path.is_file()
    if fetched:
        def fetch(tmp: Path) -> None:
            limit = _env_number("MIXER_MAX_DOWNLOAD", MAX_DOWNLOAD) if max_bytes is None else max_bytes
            seconds = _env_number("MIXER_DOWNLOAD_TIME_LIMIT", DOWNLOAD_TIME_LIMIT) if time_limit is None else time_limit
            deadline = time.monotonic() + seconds
            with open(tmp, "wb") as out, urllib.request.urlopen(plain, timeout=min(timeout, seconds)) as response:
                announced = response.headers.get("Content-Length")
                if announced is not None and int(announced) > limit:  # refused before a byte is read
                    raise MixerError(f"cannot download {url}: it is {format_bytes(int(announced))}, more than "
                                     f"MIXER_MAX_DOWNLOAD ({format_bytes(limit)}); raise MIXER_MAX_DOWNLOAD to allow it")
                if announced is not None:
                    check_disk(int(announced), folder, f"downloading {url}",
                               "free disk space, or point MIXER_CACHE at a disk with room")
                # read1: whatever one receive brings, so a server dripping bytes meets the deadline too
                # (the per-read `timeout` only catches one that stops sending)
                while chunk := response.read1(1 << 20):
                    out.write(chunk)
                    if out.tell() > limit:  # no or a false Content-Length: the count is what holds
                        raise MixerError(f"cannot download {url}: the server sent more than MIXER_MAX_DOWNLOAD "
                                         f"({format_bytes(limit)}); raise MIXER_MAX_DOWNLOAD to allow it")
                    if time.monotonic() > deadline:
                        raise MixerError(f"cannot download {url}: not complete after {seconds:g} s "
                                         f"({out.tell()} bytes); raise MIXER_DOWNLOAD_TIME_LIMIT or try again")
                if announced is not None and out.tell() != int(announced):
                    raise MixerError(f"cannot download {url}: the connection ended after {out.tell()} of "
                                     f"{announced} bytes; try again")

        try:
            atomic_write(path, fetch, user_error=False)  # the OSErrors are worded below, as a download's
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
            raise MixerError(f"cannot download {url} ({reason}); check the address and the network") from None
    digest = sha256_file(path)
    if expected is not None and digest != expected.lower():
        if fetched:
            path.unlink()
        raise MixerError(f"{url}: sha256 {digest} is not the {expected} the URL asks for"
                         + ("; the download was removed" if fetched else f"; delete {path} to download it again"))
    return path, {"url": plain}
