"""Where the images are: the `data` param resolved to a list of (file, class) pairs, nothing decoded yet.

Sources: the embedded digits (written out as an image folder first, so it takes the user's path),
an image folder (one sub-folder per class), or a CSV (`path,label`, or the Kaggle dog-breed
`id,breed` with images at `<folder>/<id>.jpg`). Files are listed and sorted; whatever cannot be
read safely (links out of the folder or in a loop, FIFOs and devices, names that are not UTF-8) is
skipped with its reason. `find_images` lists a folder for `mixer predict` by the same walk.
"""

from __future__ import annotations

import errno
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mixer.errors import MixerError
from mixer.files import file_kind
from mixer.text import decoded

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


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
    """One class per top-level sub-folder; images in nested folders belong to that class.

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
        raise MixerError(f"data {root} is neither a folder nor a CSV file")
    inside = root.resolve()
    if inside in _home_and_above() | {Path(inside.anchor)}:
        raise MixerError(f"data folder {printable(root)} is the file system root, your home folder or a folder above "
                         "it: every file below would be listed; put the images in a folder of their own "
                         "(data/<name>/<class>/...) and set dataset to it")
    classes = _class_folders(root, inside)
    if not classes:
        raise MixerError(f"data folder {printable(root)} has no class sub-folders: put each class's images in a "
                         f"folder of its own ({printable(root)}/<class>/...)")
    if any(name.lower() in SPLIT_FOLDERS for name in classes):
        return _scan_split_folder(root, classes)
    _refuse_alike([root / name for name in classes])
    items: list[tuple[str, str]] = []
    skipped: list[dict] = []
    seen = {_identity(root)}
    for name in classes:
        _walk(root, root / name, name, seen, items, skipped, inside=inside)
    return Source(root, sorted(items), classes, skipped)


def _home_and_above() -> set[Path]:
    """The user's home and the folders above it: a data folder there would walk a whole disk (`dataset: ~`)."""
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home to be found: nothing to refuse
        return set()
    return {home, *home.parents}


def _scan_split_folder(root: Path, folders: list[str]) -> Source:
    """root/<split>/<class>/...: every split's class folders, scanned as `scan_folder` scans one folder.

    Read this way only when every top-level folder names a split, one folder per split, `train` among
    them; anything else is refused, as either reading could be wrong."""
    splits = [s for s in folders if s.lower() in SPLIT_FOLDERS]
    others = [s for s in folders if s.lower() not in SPLIT_FOLDERS]
    listed = ", ".join(s + "/" for s in splits)
    if others:
        beside = ", ".join(s + "/" for s in others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise MixerError(f"data folder {printable(root)} has split folders ({listed}) beside other folders ({beside}), "
                         f"so it reads neither as one folder per class nor as split folders: move {others[0]}/ out "
                         f"of it, or into the split folders if it is a class")
    named = [SPLIT_FOLDERS[s.lower()] for s in splits]
    if len(set(named)) < len(named):
        twice = [s + "/" for s in splits if named.count(SPLIT_FOLDERS[s.lower()]) > 1]
        raise MixerError(f"data folder {printable(root)} has {' and '.join(twice)}: one folder per split")
    if "train" not in named:
        raise MixerError(f"data folder {printable(root)} has {listed} but no train/: a split data folder needs "
                         "train/<class>/ to learn from; add it, or rename the folders if they are classes")
    inside = root.resolve()
    parts = {s: _class_folders(root / s, inside) for s in splits}
    _refuse_alike([root / s / name for s in splits for name in parts[s]])
    classes = sorted(set().union(*parts.values()))
    items: list[tuple[str, str]] = []
    skipped: list[dict] = []
    seen = {_identity(root)}
    for split in splits:
        for name in parts[split]:
            _walk(root, root / split / name, name, seen, items, skipped, inside=inside)
    return Source(root, sorted(items), classes, skipped, given_splits=tuple(sorted(set(named))),
                  split_folders={SPLIT_FOLDERS[s.lower()]: s for s in splits})


def _refuse_alike(folders: list[Path]) -> None:
    """Two class folders whose names differ only by case (`Cat`, `cat`) or Unicode form (`café` composed
    or not, NFC and NFD) would be two classes that print as one: refused, naming both."""
    first: dict[str, Path] = {}
    for folder in folders:
        key = unicodedata.normalize("NFC", folder.name).casefold()
        other = first.setdefault(key, folder)
        if other.name != folder.name:
            raise MixerError(f"class folders {printable(other)} and {printable(folder)} differ only by letter case "
                             "or Unicode form (NFC/NFD), so they would be two classes that print alike: merge them "
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
    """Resolve the `data` param: 'digits', an image folder, or a CSV file."""
    if data == "digits":
        return scan_folder(export_digits(Path(scratch) / "digits"))
    path = Path(data)
    if path.suffix.lower() == ".csv":
        if not path.is_file():
            raise MixerError(f"data file {path} does not exist")
        return read_csv(path)
    return scan_folder(path)
