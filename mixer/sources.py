"""Where the images are: the `data` param resolved to a list of (file, class) pairs, nothing decoded yet.

Sources: the embedded digits (written out as an image folder first, so it takes the user's path),
an image folder (one sub-folder per class), a zip or tar archive of such a folder (read in place,
never unpacked), or a CSV (`path,label`, or the Kaggle dog-breed `id,breed` with images at
`<folder>/<id>.jpg`). Files are listed and sorted; whatever cannot be read safely (links out of the
folder or in a loop, FIFOs and devices, names that are not UTF-8; in an archive also links, members
whose path leads out of it) is skipped with its reason. A folder and an archive are read by one
layout rule (`layout`: one folder per class, or split folders). `find_images` lists a folder for
`mixer predict` by the same walk.
"""

from __future__ import annotations

import errno
import io
import lzma
import os
import stat
import tarfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image

from mixer.decoding import Member, open_member
from mixer.errors import MixerError
from mixer.files import file_kind
from mixer.text import decoded

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# An archive listing more members, or declaring more bytes of regular files, than this is not a data set
# to read (a zip bomb declares petabytes): refused before anything is decoded.
MAX_MEMBERS = 5_000_000
MAX_ARCHIVE_BYTES = 2**40


@dataclass
class Source:
    """What to decode: a data root and (path relative to it, class name) pairs."""

    root: Path
    items: list[tuple[str, str]]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)          # files not decoded, with the reason
    label_conflicts: list[dict] = field(default_factory=list)  # CSV paths given two or more labels
    duplicate_rows: int = 0                                     # CSV rows that repeat an earlier one
    given_splits: tuple[str, ...] = ()  # a pre-split folder (train/ val/ test/): the splits it has; each item's
    # path then starts with its split's folder (see `split_of`)
    split_folders: dict[str, str] = field(default_factory=dict)  # given split -> its folder's name (`Valid`)
    members: dict[str, Member] | None = None  # an archive's: each item's member; `root` is then the archive's
    # path joined with the folder(s) that wrap the layout in it (data/dogs.zip/dogs), for messages only

    def target(self, rel: str) -> Path | Member:
        """What `mixer.decoding.decode` reads for the item at `rel`: a file, or an archive's member."""
        return self.members[rel] if self.members is not None else self.root / rel

    def open(self, rel: str) -> BinaryIO:
        """The item at `rel` opened for reading, from the folder or from the archive (OSError or ValueError if it
        cannot be): for a reader of a few items, such as `mixer.survey.survey(source, opener=source.open)`."""
        return open_member(self.members[rel]) if self.members is not None else open(self.root / rel, "rb")

    def split_of(self, rel: str) -> str:
        """The split a pre-split folder gives an item (its top folder's, `valid` and `validation` as `val`)."""
        return SPLIT_FOLDERS[rel.split("/", 1)[0].lower()]


# A folder whose top-level folders are all of these in any case, `train` among them, is split already (the
# timm and torchvision ImageFolder layout, root/train/<class>/...): the classes are the folders below them.
# Some of them beside other folders is neither layout, and refused rather than guessed.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def export_digits(dest: Path) -> Path:
    """Write scikit-learn's 8×8 digits as PNGs, one folder per class; returns the folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for (i, (image, label)) in enumerate(zip(digits.images, digits.target)):
        folder = Path(dest) / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return Path(dest)


def is_image_file(rel: Path) -> bool:
    """An image by its extension (any case), with no hidden part in its path relative to the root."""
    return rel.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel.parts)


def printable(path: str | Path) -> str:
    """A path as valid text for a file or JSON: undecodable bytes as \\xNN (for a terminal, see mixer.text.shown)."""
    return decoded(path)  # one implementation; control characters stay, so CSV and JSON keep the real name


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.fsdecode kept undecodable bytes as surrogates
        return False


def scan_folder(root: Path) -> Source:
    """One class per top-level sub-folder; images in nested folders belong to that class (or split folders:
    see `layout`).

    Links are followed, but a folder reached twice (a link loop such as `dog/up -> ..`, or a second
    name for a folder already scanned) is skipped, so no image is relabelled or counted twice. Links
    stay inside the (resolved) data folder: a link to a folder or a file outside it is skipped, so the
    cache holds only what the folder holds, as a CSV's rows may not escape it either. Only regular
    files become items: FIFOs, sockets and devices (which would block or never end) are skipped, as
    are broken links and names that are not UTF-8 (of files, and of nested folders, which are not
    scanned); each skip is reported with its reason.
    """
    root = Path(root)
    if not root.exists():
        raise MixerError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise MixerError(f"data {root} is neither a folder, a CSV file nor an archive "
                         f"({', '.join(ARCHIVE_SUFFIXES)})")
    inside = root.resolve()
    if inside in _home_and_above() | {Path(inside.anchor)}:
        raise MixerError(f"data folder {printable(root)} is the file system root, your home folder or a folder above "
                         "it: every file below would be listed; put the images in a folder of their own "
                         "(data/<name>/<class>/...) and set dataset to it")
    found = layout(root, _class_folders(root, inside), lambda split: _class_folders(root / split, inside))
    items: list[tuple[str, str]] = []
    skipped: list[dict] = []
    seen = {_identity(root)}
    for (folder, name) in found.folders.items():
        _walk(root, root / folder, name, seen, items, skipped, inside=inside)
    return Source(root, sorted(items), found.classes, skipped, given_splits=found.given_splits,
                  split_folders=found.split_folders)


def _home_and_above() -> set[Path]:
    """The user's home and the folders above it: a data folder there would walk a whole disk (`dataset: ~`)."""
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home to be found: nothing to refuse
        return set()
    return {home, *home.parents}


@dataclass(frozen=True)
class Layout:
    """How a data folder's (or archive's) folders read: its classes, and the folders that hold each."""

    classes: list[str]
    folders: dict[str, str]  # class folder, relative to the root ('beagle', 'train/beagle') -> its class
    given_splits: tuple[str, ...] = ()
    split_folders: dict[str, str] = field(default_factory=dict)

    def label_of(self, rel: str) -> str | None:
        """The class of a file at `rel` (relative to the root, '/'-separated): its class folder's, at any depth
        below it; None for a file in no class folder (beside them, or directly in a split folder)."""
        parts = rel.split("/")
        depth = 2 if self.given_splits else 1
        return self.folders.get("/".join(parts[:depth])) if len(parts) > depth else None


def layout(root: Path, folders: list[str], folders_in: Callable[[str], list[str]],
           noun: str = "data folder") -> Layout:
    """The one home of the layout rule, for a folder and an archive alike: `folders` are the root's
    folders (sorted, not hidden), `folders_in(name)` lists those of one of them (asked only of split
    folders). One class per folder; or, when every folder names a split (one folder per split, `train`
    among them), the classes are the folders below them. Anything else is refused, as either reading
    could be wrong; so are class folders that print alike. `root` and `noun` only word the messages."""
    if not folders:
        raise MixerError(f"{noun} {printable(root)} has no class sub-folders: put each class's images in a "
                         f"folder of its own ({printable(root)}/<class>/...)")
    if not any(name.lower() in SPLIT_FOLDERS for name in folders):
        _refuse_alike([root / name for name in folders])
        return Layout(list(folders), {name: name for name in folders})
    splits = [s for s in folders if s.lower() in SPLIT_FOLDERS]
    others = [s for s in folders if s.lower() not in SPLIT_FOLDERS]
    listed = ", ".join(s + "/" for s in splits)
    if others:
        beside = ", ".join(s + "/" for s in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise MixerError(f"{noun} {printable(root)} has split folders ({listed}) beside other folders ({beside}), "
                         f"so it reads neither as one folder per class nor as split folders: move {others[0]}/ out "
                         f"of it, or into the split folders if it is a class")
    named = [SPLIT_FOLDERS[s.lower()] for s in splits]
    if len(set(named)) < len(named):
        twice = [s + "/" for s in splits if named.count(SPLIT_FOLDERS[s.lower()]) > 1]
        raise MixerError(f"{noun} {printable(root)} has {' and '.join(twice)}: one folder per split")
    if "train" not in named:
        raise MixerError(f"{noun} {printable(root)} has {listed} but no train/: a split data folder needs "
                         "train/<class>/ to learn from; add it, or rename the folders if they are classes")
    parts = {s: folders_in(s) for s in splits}
    _refuse_alike([root / s / name for s in splits for name in parts[s]])
    return Layout(sorted(set().union(*parts.values())),
                  {f"{s}/{name}": name for s in splits for name in parts[s]},
                  given_splits=tuple(sorted(set(named))), split_folders={SPLIT_FOLDERS[s.lower()]: s for s in splits})


def _refuse_alike(folders: list[Path]) -> None:
    """Two class folders whose names differ only by case (`Cat`, `cat`), Unicode form (`café` composed
    or not, NFC and NFD, compatibility forms) or invisible characters (a zero-width space, a joiner)
    would be two classes that print as one: refused, naming both."""
    first: dict[str, Path] = {}
    for folder in folders:
        visible = "".join(c for c in unicodedata.normalize("NFKC", folder.name) if unicodedata.category(c) != "Cf")
        key = visible.casefold()
        other = first.setdefault(key, folder)
        if other.name != folder.name:
            raise MixerError(f"class folders {printable(other)} and {printable(folder)} differ only by letter case "
                             "or Unicode form or invisible characters, so they would be two classes that print alike: "
                             "merge them "
                             "into one folder, or rename one")


def _class_folders(folder: Path, inside: Path) -> list[str]:
    """The names of `folder`'s class folders (not hidden), each a UTF-8 name that stays inside the (resolved)
    data folder `inside`: DVC tracks the data folder, not what a link out of it reaches."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and _stat_is_dir(e.path))
    except OSError as exc:
        raise MixerError(f"cannot list data folder {printable(folder)}: {exc.strerror}") from None
    for name in names:
        if not _is_utf8(name):
            raise MixerError(f"class folder {printable(folder / name)} has a name that is not UTF-8; rename it")
        if not (folder / name).resolve().is_relative_to(inside):
            raise MixerError(f"class folder {printable(folder / name)} is a link out of the data folder; copy the "
                             "images into it instead")
    return names


def find_images(folder: Path) -> tuple[list[Path], list[dict]]:
    """The image files under `folder`, recursively and sorted, and what was skipped (see `scan_folder`).

    Links out of `folder` are followed here: it holds images to classify now, not to cache and share.
    """
    items: list[tuple[str, str]] = []
    skipped: list[dict] = []
    _walk(Path(folder), Path(folder), "", set(), items, skipped)
    return [Path(folder) / rel for (rel, _) in sorted(items)], skipped


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _stat_is_dir(path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _walk(root: Path, folder: Path, label: str, seen: set, items: list, skipped: list,
          inside: Path | None = None) -> None:
    """Collect the images under `folder` into `items`, and the skips; links must stay under `inside`
    (when given)."""
    identity = _identity(folder)
    rel = folder.relative_to(root).as_posix()
    if identity in seen:
        skipped.append({"path": printable(rel), "reason": "link to a folder already scanned (a loop or a "
                                                          "second name); not followed"})
        return
    seen.add(identity)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        skipped.append({"path": printable(rel), "reason": f"cannot list folder ({exc.strerror})"})
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        rel = path.relative_to(root)
        try:
            mode = os.stat(path).st_mode  # follows links; never opens, so never blocks
        except OSError as exc:
            if is_image_file(rel):
                reason = "link loop" if exc.errno == errno.ELOOP else "broken link" if entry.is_symlink() \
                    else f"cannot stat ({exc.strerror})"
                skipped.append({"path": printable(rel), "reason": reason})
            continue
        # only a link can lead out of the folder: what it reaches is checked, not its name
        outside = inside is not None and entry.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(inside)
        if stat.S_ISDIR(mode) and outside:
            skipped.append({"path": printable(rel), "reason": "link to a folder outside the data folder; not followed"})
        elif stat.S_ISDIR(mode) and not _is_utf8(entry.name):
            # its files' paths could not be written to the manifest; a top-level class is an error instead
            skipped.append({"path": printable(rel), "reason": "folder name is not UTF-8; not scanned"})
        elif stat.S_ISDIR(mode):
            _walk(root, path, label, seen, items, skipped, inside)
        elif not is_image_file(rel):
            continue
        elif not _is_utf8(entry.name):
            skipped.append({"path": printable(rel), "reason": "file name is not UTF-8"})
        elif not stat.S_ISREG(mode):
            skipped.append({"path": printable(rel), "reason": f"not a regular file ({file_kind(mode)})"})
        elif outside:
            skipped.append({"path": printable(rel), "reason": "link to a file outside the data folder; not read"})
        else:
            items.append((rel.as_posix(), label))


def is_archive(path: str | Path) -> bool:
    """A zip or tar file by its name (`.zip`, `.tar`, `.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`, any case)."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def scan_archive(path: Path) -> Source:
    """A zip or tar of an image folder, read in place: the layouts and skips of `scan_folder`.

    Members are listed, never unpacked: the folder(s) that wrap everything (`dogs/` in a `dogs.zip` made
    by `zip -r dogs.zip dogs`) are looked through, and the rest is read by `layout`, as the folder
    unpacked would be. Only regular-file members become items (their names relative to the layout's
    root, so the split is the unpacked folder's); links, devices and encrypted or sparse members in a
    class folder are skipped with their reason, as are members whose path leads out of the archive
    (absolute, `..`) and image names that are not UTF-8. Hidden members (a part starting with '.',
    `__MACOSX/`) are ignored. A name listed twice is read from its last member, as unpacking would.
    An archive that cannot be listed, or lists more than MAX_MEMBERS members or MAX_ARCHIVE_BYTES
    bytes, is a MixerError naming it.
    """
    path = Path(path)
    if not path.exists():
        raise MixerError(f"data archive {printable(path)} does not exist")
    kind = "zip" if path.name.lower().endswith(".zip") else "tar"
    try:
        entries = list(_zip_entries(path) if kind == "zip" else _tar_entries(path))
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, NotImplementedError, zlib.error,
            lzma.LZMAError) as exc:
        why = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MixerError(f"data archive {printable(path)} is not a readable {kind} archive ({why})") from None
    files: dict[str, tuple[str | None, Member | None]] = {}  # path -> (why it is not read, its member): the last
    folders: set[str] = set()
    again: list[str] = []
    refused: list[tuple[str, str]] = []  # (member name, why): named relative to the layout's root once it is known
    for (name, is_folder, problem, member) in entries:
        (rel, reason) = _member_path(name, is_folder)
        if rel is None:
            if reason is not None:
                refused.append((name, reason))
            continue
        parts = rel.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts) + (1 if is_folder else 0)))
        if not is_folder:
            if rel in files:
                again.append(rel)
            files[rel] = (problem, member)
    children: dict[str, set[str]] = {}
    for folder in folders:
        (parent, _, name) = folder.rpartition("/")
        children.setdefault(parent, set()).add(name)
    prefix = ""  # the folder(s) that wrap everything: one folder at the top, not a split's, holding folders
    while len(children.get(prefix, ())) == 1:
        (only,) = children[prefix]
        inner = f"{prefix}/{only}" if prefix else only
        if only.lower() in SPLIT_FOLDERS or not children.get(inner):
            break
        prefix = inner
    root = Path(path, *prefix.split("/")) if prefix else path

    def under(folder: str) -> list[str]:
        return sorted(children.get(f"{prefix}/{folder}" if prefix else folder, ()))

    found = layout(root, sorted(children.get(prefix, ())), under, noun="data archive")
    items: list[tuple[str, str]] = []
    members: dict[str, Member] = {}
    start = len(prefix) + 1 if prefix else 0

    def local(rel: str) -> str | None:  # a path relative to the layout's root, if it lies below it
        return rel[start:] if not prefix or rel.startswith(prefix + "/") else None

    up = "../" * (prefix.count("/") + 1) if prefix else ""  # from the layout's root to the archive's top
    skipped = [{"path": printable(local(name) or (name if name.startswith("/") else up + name)), "reason": reason}
               for (name, reason) in refused]
    for rel in again:
        if local(rel) is not None and found.label_of(local(rel)) is not None and is_image_file(PurePosixPath(rel)):
            skipped.append({"path": local(rel), "reason": "an earlier member of the same name; the last one is read, "
                                                          "as unpacking would"})
    for (rel, (problem, member)) in files.items():
        label = found.label_of(local(rel)) if local(rel) is not None else None
        if label is None:
            continue
        if problem is not None:
            skipped.append({"path": local(rel), "reason": problem})
        elif is_image_file(PurePosixPath(rel)):
            items.append((local(rel), label))
            members[local(rel)] = member
    return Source(root, sorted(items), found.classes, skipped, given_splits=found.given_splits,
                  split_folders=found.split_folders, members=members)


def _member_path(name: str, is_folder: bool) -> tuple[str | None, str | None]:
    """A member's path, '/'-separated without empty or '.' parts; or None and why it is not read (None: ignored,
    as a hidden member is, `__MACOSX/` included)."""
    if name.startswith(("/", "\\")) or (len(name) >= 3 and name[0].isascii() and name[0].isalpha()
                                          and name[1] == ":" and name[2] in "/\\"):  # C:/ too
        return None, None if is_folder else "absolute path in the archive; not read"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None, None if is_folder else "path leads out of the archive (..); not read"
    if not parts or any(part.startswith(".") or part == "__MACOSX" for part in parts):
        return None, None
    if not _is_utf8(name):  # a folder's name shows in each of its images' names
        return None, "name is not UTF-8" if not is_folder and is_image_file(PurePosixPath(*parts)) else None
    return "/".join(parts), None


def _sane(path: Path, members: int, size: int) -> None:
    if members > MAX_MEMBERS:
        raise MixerError(f"data archive {printable(path)} lists more than {MAX_MEMBERS:,} members: not a data set "
                         "to read in place; split it, or unpack it and set dataset to the folder")
    if size > MAX_ARCHIVE_BYTES:
        raise MixerError(f"data archive {printable(path)} declares more than {MAX_ARCHIVE_BYTES:,} bytes of files: "
                         "not a data set of images (a decompression bomb?); not read")


Entry = tuple[str, bool, "str | None", "Member | None"]  # name, is a folder, why not read, the member to read


def _zip_entries(path: Path) -> Iterator[Entry]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    _sane(path, len(infos), sum(info.file_size for info in infos))
    where = os.path.abspath(path)
    for info in infos:
        name = info.filename
        if not info.flag_bits & 0x800:  # no UTF-8 flag: zipfile read the bytes as cp437; most zips hold UTF-8
            name = name.encode("cp437").decode("utf-8", "surrogateescape")
        mode = info.external_attr >> 16 if info.create_system == 3 else 0  # Unix: its st_mode
        if info.is_dir() or stat.S_ISDIR(mode):
            yield name, True, None, None
        elif stat.S_ISLNK(mode):
            yield name, False, "symbolic link; links in an archive are not followed", None
        elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):
            yield name, False, f"not a regular file ({file_kind(mode)})", None
        elif info.flag_bits & 0x1:
            yield name, False, "encrypted; not read", None
        else:
            yield name, False, None, Member(where, "zip", info.filename, info.header_offset, info.file_size)


def _tar_entries(path: Path) -> Iterator[Entry]:
    where = os.path.abspath(path)
    with tarfile.open(path, "r:*") as archive:  # any compression; each header read once, in order
        total, end = 0, 0
        for (count, info) in enumerate(archive, start=1):
            if info.isreg():
                total += info.size
            _sane(path, count, total)  # before the next header is sought, past this member's data
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE * info.isreg()
            if info.isdir():
                yield info.name, True, None, None
            elif info.issym() or info.islnk():
                yield info.name, False, (f"{'symbolic' if info.issym() else 'hard'} link; links in an archive are "
                                         "not followed"), None
            elif info.sparse is not None:
                yield info.name, False, "sparse member; not read", None
            elif info.ischr() or info.isblk() or info.isfifo():
                kind = "character device" if info.ischr() else "block device" if info.isblk() else "FIFO"
                yield info.name, False, f"not a regular file ({kind})", None
            elif not info.isreg():
                yield info.name, False, "not a regular file", None
            else:
                yield info.name, False, None, Member(where, "tar", info.name, info.offset_data, info.size)
        if isinstance(archive.fileobj, io.BufferedReader):  # not compressed: a cut one lists without an error
            _whole_tar(archive.fileobj, end)


def _whole_tar(file, end: int) -> None:
    """An uncompressed tar ends with its last member's data and then a block of zeros at least (POSIX asks for
    two; GNU tar takes one): tarfile takes a tar cut in a member's data or header, or between two members, for
    one that ends there (a compressed one fails as its stream ends early)."""
    file.seek(end)
    tail = file.read(2**20)
    if len(tail) < tarfile.BLOCKSIZE or tail.strip(b"\0"):
        raise tarfile.ReadError("unexpected end of data: cut short or damaged")


def read_csv(csv: Path) -> Source:
    """`path,label` (paths relative to the CSV) or Kaggle's `id,breed` with `<id>.jpg` beside it.

    A row repeated word for word counts once; a path listed with two labels keeps its first label,
    and both are reported (`label_conflicts`; an error under `strict`).
    """
    csv = Path(csv)
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MixerError(f"{csv} is not a readable CSV ({str(exc).splitlines()[0]})") from None
    root = csv.parent
    if {"path", "label"} <= set(table.columns):
        paths, labels = list(table["path"]), list(table["label"])
    elif {"id", "breed"} <= set(table.columns):
        folder = next((d for d in (root / "train", root / "images", root) if d.is_dir()), root)
        prefix = folder.relative_to(root).as_posix()
        paths = [f"{prefix}/{i}.jpg" if prefix != "." else f"{i}.jpg" for i in table["id"]]
        labels = list(table["breed"])
    else:
        raise MixerError(f"{csv} needs columns path,label or id,breed; it has {','.join(table.columns)}")
    label_of: dict[str, str] = {}
    conflicts: dict[str, list[str]] = {}
    pairs: set[tuple[str, str]] = set()
    missing, special, duplicate_rows = [], [], 0
    resolved_root = root.resolve()
    for (line, (path, label)) in enumerate(zip(paths, labels), start=2):
        if not label:
            raise MixerError(f"{csv}, line {line}: {path!r} has an empty label")
        key = Path(path).as_posix()
        if (key, label) in pairs:
            duplicate_rows += 1
            continue
        pairs.add((key, label))
        if key in label_of:
            conflicts.setdefault(key, [label_of[key]]).append(label)
            continue
        if "\0" in path:  # no file can be named so, and the OS calls below would raise ValueError
            raise MixerError(f"{csv}, line {line}: path {path!r} holds a NUL byte, which no file name can hold; "
                             "fix that row")
        full = (root / path).resolve()
        if not full.is_relative_to(resolved_root):
            raise MixerError(f"{csv}, line {line}: path {path!r} escapes the data folder {root}")
        try:
            mode = os.stat(full).st_mode
        except OSError:
            missing.append(path)
            continue
        if not stat.S_ISREG(mode):
            special.append(f"{path!r} ({file_kind(mode) if not stat.S_ISDIR(mode) else 'folder'})")
            continue
        label_of[key] = label
    if missing:
        raise MixerError(f"{csv}: {len(missing)} labelled image(s) do not exist, e.g. {missing[0]!r}")
    if special:
        raise MixerError(f"{csv}: {len(special)} labelled path(s) are not regular files, e.g. {special[0]}")
    items = sorted(label_of.items())
    report = [{"path": k, "labels": v, "kept": v[0]} for (k, v) in sorted(conflicts.items())]
    return Source(root, items, sorted(set(label_of.values())), label_conflicts=report,
                  duplicate_rows=duplicate_rows)


def open_source(data: str, scratch: Path) -> Source:
    """Resolve the `data` param: 'digits', an image folder, a zip or tar archive of one, or a CSV file."""
    if data == "digits":
        return scan_folder(export_digits(Path(scratch) / "digits"))
    path = Path(data)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise MixerError(f"data file {path} does not exist")
        return read_csv(path)
    if is_archive(path) and not path.is_dir():
        return scan_archive(path)
    return scan_folder(path)
