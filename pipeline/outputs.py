"""What a command may replace, and how: the one home of the rule every writing command goes through.

The rule:
- A command writes only a path that does not exist, an empty folder, or an artifact of the kind it
  writes, recognised by what it holds (a model directory's config.json, a prepared cache's
  prepared.json, a predictions file's header; see `Kind`). Anything else (a user's file or folder, a
  device, a FIFO, a socket, a link to something that is not ours, or a path that is, or holds, one of
  the command's inputs) is one line naming the path and what is there, before any work.
- A path that a user chooses (output_dir, --out, import-weights' folder) never is, or lies inside, the
  project's own places (data/, prepared/, checkpoints/, reports/, .git, .dvc, the package's source)
  and never is the project folder or one of its ancestors; the outputs of one command never overlap.
- One writer per path: a command takes an exclusive lock on every path it writes (a second writer
  stops at once, naming the first). Locks and their owner records live in a folder of the user's own
  (mode 0700, checked), and records are opened without following links.
- Complete or untouched: new contents are written into hidden staging paths beside the targets and
  moved over them only when all the work has succeeded. A folder that cannot be renamed (a mount
  point) is filled in place instead. What a killed writer left is removed by the next writer, but only
  the paths the killed writer listed in its owner record: a user's `.output.old-2024/` is never touched.
"""

from __future__ import annotations

import csv
import errno
import fnmatch
import hashlib
import json
import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from filelock import FileLock, Timeout

from mixer.checkpoint import CONFIG, FORMAT, WEIGHTS
from mixer.data import IMAGES, INFO, MANIFEST
from mixer.errors import MixerError
from mixer.files import atomic_write, file_kind
from mixer.inference import ONNX_FILE, columns_for
from mixer.text import clipped, decoded
from mixer.train_state import BEST, KEY_GLOB, LAST


# ---- kinds of artifact -----------------------------------------------------------------------

@dataclass(frozen=True)
class Kind:
    """A kind of artifact: what it is called, whether it is a folder, and how to recognise one of ours.

    A folder is ours when every entry is one `entries` names (or `keep`), and `recognise` (if given)
    accepts it; a file is ours when `recognise` accepts it. `keep` entries are carried across a
    replacement: they belong to someone else (the `.gitignore` DVC writes beside its outputs).
    """

    name: str
    folder: bool
    entries: frozenset[str] = frozenset()
    recognise: Callable[[Path], bool] | None = None
    keep: frozenset[str] = frozenset({".gitignore"})
    temporaries: str = ""  # a glob of leftovers its own writer removes (mixer.train_state.remove_temporaries)
    named: str = ""        # a glob of entries it names itself (a run folder's per-run folders)

    def owns(self, path: Path) -> str | None:
        """None when `path` (which exists) is an artifact of this kind; else what is there instead."""
        if not self.folder:
            return None if self.recognise is not None and self.recognise(path) else f"a file that is not a {self.name}"
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            return f"a folder that cannot be read ({exc.strerror})"
        if all(n in self.keep for n in names):  # empty, but for DVC's .gitignore
            return None
        foreign = [n for n in names if n not in self.entries | self.keep and not fnmatch.fnmatch(n, self.temporaries)
                   and not (self.named and fnmatch.fnmatch(n, self.named) and (path / n).is_dir())]
        if foreign:
            return f"a folder with files this command did not write (e.g. {_shown(path / foreign[0])})"
        if self.recognise is not None and not self.recognise(path):
            return f"a folder that is not a {self.name}"
        return None


def _json_field(path: Path, key: str, value) -> bool:
    try:
        return json.loads(path.read_bytes()).get(key) == value
    except (OSError, ValueError, AttributeError):
        return False


def _has_keys(path: Path, keys: set[str]) -> bool:
    try:
        return keys <= set(json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):
        return False


def _is_model_dir(path: Path) -> bool:
    return (path / CONFIG).is_file() and _json_field(path / CONFIG, "format", FORMAT)


def _first_line(path: Path) -> str | None:
    """The first line of a regular file (up to 4 MiB: a top-k header over thousands of classes), as text."""
    if not path.is_file():  # never open a FIFO: it would block
        return None
    try:
        with open(path, "rb") as f:
            return f.readline(1 << 22).decode("utf-8", "surrogateescape")
    except OSError:
        return None


def _is_predictions(path: Path) -> bool:
    """The first line `mixer predict` writes: the CSV header, or a JSON Lines record, with exactly its columns."""
    first = _first_line(path)
    if first is None:
        return False
    header = next(csv.reader([first]), [])
    if header == columns_for((len(header) - 2) // 2):
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and list(record) == columns_for((len(record) - 2) // 2)


def _starts_with(path: Path, magic: str) -> bool:
    """A regular file that begins with `magic` (an ONNX protobuf begins with its ir_version field, 0x08)."""
    return (_first_line(path) or "").startswith(magic)


def _json_object_with(key: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and _has_keys(path, {key})


def _csv_header(*columns: str) -> Callable[[Path], bool]:
    return lambda path: next(csv.reader([_first_line(path) or ""]), [])[:len(columns)] == list(columns)


# The files of the project's reports/, each recognised by how its writer begins it.
REPORT_FILES = {
    "metrics.json": _json_object_with("accuracy"),
    "data.json": _json_object_with("classes"),
    "per_class.csv": _csv_header("class", "precision"),
    "confusion.csv": _csv_header("actual", "predicted"),
    "README.md": lambda p: _starts_with(p, "# Run report"),
    "params-check.txt": lambda p: _starts_with(p, "params.yaml passed `mixer check`"),
}


def _is_report(path: Path) -> bool:
    return path.name in REPORT_FILES and REPORT_FILES[path.name](path)


MODEL = Kind("model directory", True, frozenset({CONFIG, WEIGHTS, ONNX_FILE}), _is_model_dir)
PREPARED = Kind("prepared cache", True, frozenset({IMAGES, MANIFEST, INFO}),
                lambda p: not os.path.lexists(p / INFO) or (p / INFO).is_file()
                and _has_keys(p / INFO, {"classes", "data_hash"}))
TRAIN_LOG = Kind("training log", True, frozenset({"metrics.json", "params.yaml", "plots", "report.html",
                                                  "report.md", "dvc.yaml"}))
FIGURES = Kind("figures folder", True, frozenset({"confusion.png", "learning_curves.png", "mistakes.png"}))
# the folder of an output's runs: one folder per run (mixer.train_state.run_key), and the layout before that
RUN = Kind("run checkpoint folder", True, frozenset({LAST, BEST}), temporaries=".*.tmp", named=KEY_GLOB,
           keep=frozenset({".gitignore", ".DS_Store"}))  # macOS Finder writes .DS_Store into any folder it shows
REPORT = Kind("report", False, recognise=_is_report)
PREDICTIONS = Kind("predictions file", False, recognise=_is_predictions)
ONNX = Kind("ONNX model", False, recognise=lambda p: _starts_with(p, "\x08") and _is_model_dir(p.parent))


# ---- the checks, before any work ---------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A path a command writes, the kind of artifact it is, and the params key or option that named it."""

    path: Path
    kind: Kind
    named_by: str | None = None  # e.g. "output_dir": a path the user chose (see `project_places`)

    def __str__(self) -> str:
        return f"{self.named_by} {_shown(self.path)}" if self.named_by else _shown(self.path)


def project_places(extra: Iterable[Path] = ()) -> list[Path]:
    """The folders a user-chosen output may never be, or lie inside: the project's own, and the code's."""
    import mixer
    import pipeline

    from pipeline.paths import CHECKPOINTS, PREPARED as PREPARED_DIR, REPORTS

    places = [Path(mixer.__file__).parent, Path(pipeline.__file__).parent, *extra]
    if Path("dvc.yaml").exists() or Path("params.yaml").exists():  # run in a project: its folders too
        places += [PREPARED_DIR, REPORTS, CHECKPOINTS, Path("data"), Path(".git"), Path(".dvc"), Path("mixer"),
                   Path("pipeline")]
    return [Path(os.path.abspath(p)) for p in places]


@dataclass(frozen=True)
class Plan:
    """What one command writes and reads: its targets (main output first), inputs and the places to keep out of."""

    targets: tuple[Target, ...]
    inputs: tuple[Path, ...] = ()
    places: tuple[Path, ...] | None = None  # None: project_places()
    locks: tuple[Path, ...] = ()  # also locked, not written: the folder a target lies in (export's model)

    def __post_init__(self):
        for path in (*(t.path for t in self.targets), *self.inputs, *self.locks):
            if "\0" in os.fspath(path):  # no system call takes one: refused here, not as a ValueError later
                raise MixerError(f"{decoded(path)!r} holds a NUL byte, which no path can hold")

    def lock_paths(self) -> list[Path]:
        """The real paths whose locks a writer of this plan holds: its targets', then `locks`."""
        return list(dict.fromkeys(_real(p) for p in (*(t.path for t in self.targets), *self.locks)))

    def verify(self) -> None:
        """Refuse, with one line, every target this command may not write (see the module docstring).

        What killed writers left is removed first, where no writer is at work now, so it never counts
        as someone else's file.
        """
        for path in self.lock_paths():
            _tidy(path)
        self.check()

    def check(self) -> None:
        """`verify` without the tidying: for a writer that holds the locks (and so has tidied)."""
        targets = list(self.targets)
        inputs = [_real(Path(i)) for i in self.inputs if os.path.lexists(i)]
        places = [_real(p) for p in (project_places() if self.places is None else self.places)]
        root = _real(Path.cwd())
        for (n, t) in enumerate(targets):
            real = _real(t.path)
            if t.named_by is not None:
                if real == root or root.is_relative_to(real):
                    what = "the project folder" if real == root else "a folder that holds the project"
                    raise MixerError(f"{t} is {what}; choose a new folder for the {t.kind.name}")
                for place in places:
                    if real.is_relative_to(place):
                        where = "is" if real == place else f"is inside {_shown(place)},"
                        raise MixerError(f"{t} {where} one of the project's own folders; choose another path for "
                                         f"the {t.kind.name}")
            for i in inputs:
                if i.is_relative_to(real):
                    raise MixerError(f"{t} {'is' if i == real else 'holds'} {_shown(i)}, an input of this command; "
                                     "choose another path")
            for other in targets[n + 1:]:
                theirs = _real(other.path)
                if real.is_relative_to(theirs) or theirs.is_relative_to(real):
                    raise MixerError(f"{t} and {other} overlap; give the {t.kind.name} a path of its own")
            _check_target(t)


def _check_target(t: Target) -> None:
    path = t.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MixerError(f"cannot inspect {t}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):  # written where the link points, so that is what must be ours
        try:
            st = os.stat(path)
        except OSError:
            raise MixerError(f"{t} is a link to nothing ({_shown(os.readlink(path))}); remove it or choose "
                             "another path") from None
        path = _real(path)
    mode = st.st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise MixerError(f"{t} is a {file_kind(mode)}; give the path of a new {'folder' if t.kind.folder else 'file'}")
    if t.kind.folder and not stat.S_ISDIR(mode):
        raise MixerError(f"{t} exists and is not a folder; move it away or choose another path")
    if not t.kind.folder and stat.S_ISDIR(mode):
        raise MixerError(f"{t} is a folder; give a file path")
    problem = t.kind.owns(path)
    if problem is not None:
        raise MixerError(f"{t} is {problem}; move it away or choose another path (a command replaces only "
                         f"a {t.kind.name} it wrote)")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _shown(target: Path | str) -> str:
    """The path as the user most likely wrote it: relative to the working directory when inside it."""
    target = Path(os.path.abspath(target))
    try:
        shown = str(target.relative_to(Path.cwd())) or "."
    except ValueError:
        shown = str(target)
    return clipped(decoded(shown))  # a path of megabytes stays one line


# ---- locks and their owner records ---------------------------------------------------------------

def lock_folder() -> Path:
    """The user's own lock folder ($MIXER_LOCKS, else ~/.cache/mixer/locks), created 0700 and checked."""
    try:
        folder = Path(os.environ.get("MIXER_LOCKS") or Path.home() / ".cache" / "mixer" / "locks")
    except (RuntimeError, KeyError):  # no home directory (an unknown uid in a container)
        raise MixerError("no home directory for the lock folder; set MIXER_LOCKS to a folder of your own") from None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(folder)
    except OSError as exc:
        raise MixerError(f"cannot create the lock folder {folder}: {exc.strerror}") from None
    uid = os.getuid() if hasattr(os, "getuid") else st.st_uid
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise MixerError(f"the lock folder {folder} is not private (a link, another user's, or open to others); "
                         "remove it, or set MIXER_LOCKS to a folder of your own")
    return folder


class Record:
    """The owner record of one lock: who holds it, and every staging path it made (for the next writer)."""

    def __init__(self, path: Path, command: str, target: Path):
        self.path = path
        self.data = {"command": command, "pid": os.getpid(), "argv": sys.argv, "target": str(target),
                     "staged": []}

    def add(self, made: Path) -> None:
        """List `made` before it is created, so a kill at any moment leaves nothing unlisted."""
        self.data["staged"].append(str(made))
        self.write()

    def write(self) -> None:
        """Replace the record at once: a private temporary beside it, renamed over (a link there is
        replaced, never followed); an OSError is raised as it is, for the caller to word."""
        atomic_write(self.path, json.dumps(self.data), user_error=False, private=True)

    def clear(self) -> None:
        """The writer finished: nothing of its is left to clean up."""
        self.path.unlink(missing_ok=True)


def _read_record(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock_files(target: Path) -> tuple[FileLock, Path]:
    """The lock of one path (keyed by its absolute path) and its owner record's path."""
    folder = lock_folder()
    key = hashlib.sha256(os.fsencode(target)).hexdigest()[:20]
    return FileLock(folder / f"{key}.lock"), folder / f"{key}.owner"


def _lock(target: Path, command: str) -> tuple[FileLock, Record]:
    """The exclusive lock of one path, or an error naming its holder."""
    lock, owner = _lock_files(target)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = _read_record(owner)
        holder = f"another {who['command']} (pid {who['pid']})" if {"command", "pid"} <= set(who) else \
            "another mixer command"
        raise MixerError(f"{_shown(target)} is being written by {holder}; wait for it to finish or stop it") from None
    try:
        _recover(target, _read_record(owner))
        record = Record(owner, command, target)
        record.write()
    except OSError as exc:
        lock.release()
        raise MixerError(f"cannot prepare to write {_shown(target)}: {exc.strerror}") from None
    return lock, record


def _tidy(target: Path) -> None:
    """Recover `target` from a killed writer, if none is writing it now; its record then goes."""
    lock, owner = _lock_files(target)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return  # at work: `writing` will say who
    try:
        _recover(target, _read_record(owner))
        owner.unlink(missing_ok=True)
    finally:
        lock.release()


def _recover(target: Path, previous: dict) -> None:
    """Undo what the killed previous writer of `target` listed: put back a folder caught mid-swap, drop staging.

    Only listed paths named like what `Staging` and `_swap_folder` make are touched (a command lists its
    staging paths in the record of every lock it holds); the record lives in the user's private lock
    folder, so nobody else can make us delete something.
    """
    if previous.get("target") != str(target):
        return
    for name in reversed(previous.get("staged", [])):
        path = Path(name)
        if not path.name.startswith(".") or not (path.name.endswith(".partial") or ".old-" in path.name):
            continue  # only what `Staging` and `_swap_folder` make is ever listed
        if path.parent == target.parent and path.name.startswith(f".{target.name}.old-") and path.exists() \
                and not os.path.lexists(target):
            os.rename(path, target)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink(missing_ok=True)


# ---- staging and the swap ------------------------------------------------------------------------

@dataclass
class Staging:
    """New contents for the targets, moved over them by `commit`."""

    records: dict[Path, Record]  # by the locked path's real path
    kinds: dict[Path, Kind]  # by the target's real path
    staged: list[tuple[Path, Path]] = field(default_factory=list)  # (staging path, real target)
    swapping: bool = False  # inside `commit`: if it stops there, the record must stay for the next writer
    made_folders: list[Path] = field(default_factory=list)  # missing parents it created, outermost first

    def dir(self, target: Path) -> Path:
        """An empty folder that becomes `target` (a folder) at the end."""
        return self._stage(Path(target), folder=True)

    def file(self, target: Path) -> Path:
        """A path to write that becomes `target` (a file) at the end."""
        return self._stage(Path(target), folder=False)

    def _stage(self, target: Path, folder: bool) -> Path:
        real = _real(target)  # write where a link points
        beside = real if folder and os.path.ismount(real) else real.parent  # a mount point cannot be renamed
        made = beside / f".{real.name}.{secrets.token_hex(4)}.partial"
        for record in self.records.values():  # whichever of these locks the next writer takes, it finds them
            record.add(made)
        missing = [f for f in (beside, *beside.parents) if not f.exists()]
        try:
            beside.mkdir(parents=True, exist_ok=True)
            self.made_folders.extend(reversed(missing))  # outermost first: removed last, if still empty
            if folder:
                made.mkdir(mode=0o777)  # the umask decides, as for any folder the user makes
            else:
                os.close(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise MixerError(f"cannot write beside {_shown(target)}: {exc.strerror}") from None
        self.staged.append((made, real))
        return made

    def commit(self) -> None:
        self.swapping = True
        for (new, target) in self.staged:
            if new.is_dir():
                _swap_folder(new, target, self.kinds[target], self.records[target])
            else:
                os.replace(new, target)
        self.staged = []
        self.swapping = False

    def target_of(self, path: str | Path) -> str:
        """A path inside a staging path, shown as the path it will have in its target."""
        path = Path(os.path.abspath(path))
        for (new, target) in self.staged:
            if path.is_relative_to(new):
                return _shown(target / path.relative_to(new) if path != new else target)
        return _shown(path)

    def discard(self) -> None:
        for (new, _) in self.staged:
            if new.is_dir():
                shutil.rmtree(new, ignore_errors=True)
            else:
                new.unlink(missing_ok=True)
        self.staged = []
        for folder in reversed(self.made_folders):  # the parents it made for nothing (reports/ on a first run)
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else put something there meanwhile
                pass
        self.made_folders = []


def _swap_folder(new: Path, target: Path, kind: Kind, record: Record) -> None:
    """Put the staged folder `new` in place of `target`, keeping `kind.keep` (what others keep in our folder).

    Ownership is checked again on what is swapped out: a file someone put in the folder while the
    command ran makes it stop, with the folder as it was.
    """
    for name in kind.keep:
        if (target / name).is_file() and not (new / name).exists():
            shutil.copy2(target / name, new / name)
    if new.parent == target:  # a mount point: empty it of our old entries, move the new ones in
        theirs = [n for n in os.listdir(target) if n not in kind.entries | kind.keep and target / n != new]
        if theirs:
            raise MixerError(f"{_shown(target)} gained {theirs[0]!r} while this command ran; move it away and run again")
        for entry in os.listdir(target):
            path = target / entry
            if entry in kind.entries:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for entry in os.listdir(new):
            os.replace(new / entry, target / entry)
        new.rmdir()
        return
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    record.add(old)
    os.rename(target, old)
    problem = kind.owns(old)
    if problem is not None:
        os.rename(old, target)
        raise MixerError(f"{_shown(target)} became {problem} while this command ran; move it away and run again")
    os.rename(new, target)
    shutil.rmtree(old)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextmanager
def writing(command: str, plan: Plan) -> Iterator[Staging]:
    """Hold the lock of every target for `command`, clean up after killed writers, check, stage, commit.

    Locks are taken in the order given (the main output first, so a clash names it) and never waited
    for, so two commands cannot deadlock. The targets are checked under the locks, so what was
    checked is what is replaced.
    """
    held: list[FileLock] = []
    records: dict[Path, Record] = {}
    staging = None
    try:
        for real in plan.lock_paths():
            lock, records[real] = _lock(real, command)
            held.append(lock)
        plan.check()
        staging = Staging(records, {_real(t.path): t.kind for t in plan.targets})
        try:
            yield staging
            staging.commit()
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            where = staging.target_of(exc.filename) if exc.filename else \
                " or ".join(_shown(t.path) for t in plan.targets)
            raise MixerError(f"cannot write {where}: {exc.strerror}; nothing was replaced") from None
        finally:
            staging.discard()
    finally:
        for (lock, record) in reversed(list(zip(held, records.values()))):
            if staging is None or not staging.swapping:  # else what `_recover` needs stays listed
                record.clear()
            lock.release()
