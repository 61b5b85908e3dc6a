"""Image sources → a decoded, split, memory-mappable cache that training reads without decoding again.

Sources: the embedded digits (written out as an image folder first, so it takes the user's path),
an image folder (one sub-folder per class), or a CSV (`path,label`, or the Kaggle dog-breed
`id,breed` with images at `<folder>/<id>.jpg`). Files are listed, sorted, decoded in parallel
worker processes and streamed into `images.npy`; the split is made on what decoded, per class,
seeded, so the same file lands in the same split on every run and machine.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import multiprocessing
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mixer.errors import MixerError
from mixer.preprocess import to_float
from mixer.split import SPLITS, find_cross_split_duplicates, split_by_class
from mixer.text import decoded, spreadsheet_safe

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
IMAGES, MANIFEST, INFO = "images.npy", "manifest.csv", "prepared.json"  # the files of a prepared cache


@dataclass
class Source:
    """What to decode: a data root and (path relative to it, class name) pairs."""

    root: Path
    items: list[tuple[str, str]]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)          # files not decoded, with the reason
    label_conflicts: list[dict] = field(default_factory=list)  # CSV paths given two or more labels
    duplicate_rows: int = 0                                     # CSV rows that repeat an earlier one


# ---- sources ---------------------------------------------------------------------------------

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
    classes = sorted(e.name for e in os.scandir(root) if not e.name.startswith(".") and _stat_is_dir(e.path))
    inside = root.resolve()
    for name in classes:
        if not _is_utf8(name):
            raise MixerError(f"class folder {printable(root / name)} has a name that is not UTF-8; rename it")
        if not (root / name).resolve().is_relative_to(inside):  # DVC tracks the folder, not what a link reaches
            raise MixerError(f"class folder {printable(root / name)} is a link out of the data folder; copy the "
                             "images into it instead")
    if not classes:
        raise MixerError(f"data folder {root} has no class sub-folders")
    items: list[tuple[str, str]] = []
    skipped: list[dict] = []
    seen = {_identity(root)}
    for name in classes:
        _walk(root, root / name, name, seen, items, skipped, inside=inside)
    return Source(root, sorted(items), classes, skipped)


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


def file_kind(mode: int) -> str:
    """What a path that is neither a folder nor a regular file is, in words (from its st_mode)."""
    for (test, name) in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                         (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


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


# ---- decoding --------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette, alpha (on a white background), L, 16-bit, CMYK."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, shape: tuple[int, int], policy: str) -> Image.Image:
    """`stretch` to (H, W), or `center_crop`: scale the shorter side to fit, then crop the centre."""
    height, width = shape
    if policy == "center_crop":
        scale = max(height / image.height, width / image.width)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        return image.crop((left, top, left + width, top + height))
    return image.resize((width, height), Image.Resampling.BICUBIC)


def decode(path: Path, shape: tuple[int, int], policy: str = "stretch") -> tuple[np.ndarray, str]:
    """One file → (uint8 array H×W×3, hash of the decoded pixels); raises ValueError if unusable.

    Only a regular file is read (it is opened without blocking, so a FIFO cannot hang us). Memory is
    bounded by the pixel limit (`Image.MAX_IMAGE_PIXELS`, about 89 M pixels; more is refused as a
    decompression bomb): a JPEG much larger than `shape` is decoded at a reduced scale, any other
    image is shrunk by whole factors before its colours are converted.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a regular file ({file_kind(mode) if not stat.S_ISDIR(mode) else 'folder'})")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(file) as image:
                    image = to_rgb(ImageOps.exif_transpose(shrink(image, shape)))  # orientation before resizing
                    digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
                    return np.asarray(resize(image, shape, policy), dtype=np.uint8), digest
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ValueError(f"decompression bomb: {exc}") from None
            except UnidentifiedImageError:
                raise ValueError("not an image") from None
            except (OSError, SyntaxError, EOFError) as exc:
                raise ValueError(f"cannot decode ({exc})") from None


def shrink(image: Image.Image, shape: tuple[int, int]) -> Image.Image:
    """Reduce an image much larger than `shape` by a whole factor, keeping at least 2× the target.

    The factor is the same for both axes and leaves the shorter side at least twice the longer
    target side, so neither resize policy nor a later EXIF rotation ever upsamples.
    """
    keep = 2 * max(shape)
    if image.format == "JPEG":
        image.draft(image.mode, (keep, keep))  # DCT-domain scaling while decoding
    factor = min(image.size) // keep
    if factor < 2:
        return image
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BOX)


def _decode_job(args):
    index, path, shape, policy = args
    try:
        array, digest = decode(path, shape, policy)
        return index, array, digest, None
    except ValueError as exc:
        return index, None, None, str(exc)


# ---- prepare ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareConfig:
    image_shape: tuple[int, int]
    resize: str = "stretch"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    num_classes: int | None = None
    strict: bool = False
    drop_duplicates: bool = True


def prepare(source: Source, out_dir: Path, config: PrepareConfig, workers: int = 1,
            progress=None) -> dict:
    """Decode `source` into `out_dir` (images.npy, manifest.csv, prepared.json); returns the data report."""
    if len(source.classes) < 2:
        raise MixerError(f"data {source.root} has {len(source.classes)} class; at least 2 are needed")
    if config.num_classes is not None and config.num_classes != len(source.classes):
        raise MixerError(f"num_classes is {config.num_classes} but data {source.root} has "
                         f"{len(source.classes)} classes")
    if config.strict and source.label_conflicts:
        c = source.label_conflicts[0]
        raise MixerError(f"{source.root}: {c['path']!r} is labelled {' and '.join(map(repr, c['labels']))} "
                         f"(strict: true; {len(source.label_conflicts)} such path(s))")
    if config.strict and source.skipped:
        s = source.skipped[0]
        raise MixerError(f"{printable(source.root / s['path'])}: {s['reason']} (strict: true)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = config.image_shape
    n = len(source.items)
    if n == 0:
        raise MixerError(f"data {source.root} has no images")
    # The .npy header first, then each image written at its row's offset: pages go to the file,
    # not to this process, so memory stays flat however large the data set.
    header = np.lib.format.open_memmap(out_dir / IMAGES, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
    offset, row_bytes = header.offset, height * width * 3
    del header
    digests: list[str | None] = [None] * n
    skipped = list(source.skipped)
    jobs = [(i, source.root / rel, config.image_shape, config.resize) for (i, (rel, _)) in enumerate(source.items)]
    with open(out_dir / IMAGES, "r+b") as cache:
        for (index, array, digest, error) in decode_many(jobs, workers):
            if error is None:
                cache.seek(offset + index * row_bytes)
                cache.write(array.tobytes())
                digests[index] = digest
            elif config.strict:
                raise MixerError(f"{source.root / source.items[index][0]}: {error} (strict: true)")
            else:
                skipped.append({"path": source.items[index][0], "reason": error})
            if progress is not None:
                progress()

    class_index = {name: i for (i, name) in enumerate(source.classes)}
    table = pd.DataFrame({
        "row": np.arange(n),
        "path": [rel for (rel, _) in source.items],
        "label_name": [label for (_, label) in source.items],
        "hash": digests,
    })
    table["label"] = table["label_name"].map(class_index)
    table = table[table["hash"].notna()].reset_index(drop=True)
    empty = [c for c in source.classes if c not in set(table["label_name"])]
    if empty:
        raise MixerError(f"class {empty[0]!r} in {source.root} has no usable image")
    table["split"] = split_by_class(list(table["path"]), table["label"].to_numpy(),
                                    config.val_fraction, config.test_fraction, config.seed)
    duplicates = find_cross_split_duplicates(table)
    if config.drop_duplicates and duplicates:
        dropped = {d["path"] for d in duplicates}
        table = table[~table["path"].isin(dropped)].reset_index(drop=True)
    write_csv(table, out_dir / MANIFEST, spreadsheet=False)  # read back by open_prepared: names as they are
    counts = {s: {c: int(((table["split"] == s) & (table["label_name"] == c)).sum()) for c in source.classes}
              for s in SPLITS}
    info = {"classes": source.classes, "image_shape": list(config.image_shape), "resize": config.resize,
            "rows": n, "data_hash": _data_hash(out_dir / MANIFEST, config.image_shape, config.resize),
            # what made the split: the hash covers its outcome, these let a mismatch be explained
            "split": {"seed": config.seed, "val_fraction": config.val_fraction, "test_fraction": config.test_fraction}}
    (out_dir / INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return {
        "classes": source.classes,
        "counts": counts,
        "skipped": sorted(skipped, key=lambda d: d["path"]),
        "duplicates": duplicates,
        "duplicates_dropped": bool(config.drop_duplicates),
        "label_conflicts": source.label_conflicts,
        "duplicate_rows": source.duplicate_rows,
        "image_shape": list(config.image_shape),
        "resize": config.resize,
        "data_hash": info["data_hash"],
    }


def write_csv(table: pd.DataFrame, target, header: bool = True, spreadsheet: bool = True) -> None:
    """`table` as CSV (to a path or an open text file) with every text field quoted: a name holding a
    carriage return, a form feed or a line break (all legal in file names) reads back as written.

    With `spreadsheet` (for files people open: predictions, per_class.csv, confusion.csv) a text cell
    starting with =, +, -, @, tab or CR gets a leading `'` (mixer.text.spreadsheet_safe), so it is not
    run as a formula; a class named "-1" reads back as "'-1" there. The manifest, which this package
    reads back, passes False and keeps every name as it is.
    """
    if spreadsheet:
        table = table.copy()  # the caller's table keeps its values
        for i in range(table.shape[1]):
            if pd.api.types.is_object_dtype(table.dtypes.iloc[i]) or pd.api.types.is_string_dtype(table.dtypes.iloc[i]):
                table.isetitem(i, table.iloc[:, i].map(spreadsheet_safe))  # numbers in the column stay numbers
    table.to_csv(target, index=False, header=header, quoting=csv.QUOTE_NONNUMERIC)


def _data_hash(manifest: Path, image_shape: tuple[int, int], resize: str) -> str:
    """What the cache holds, in one hash: every kept file's decoded content, label and split, and the
    shape and policy that made its rows (the rows themselves follow from these)."""
    digest = hashlib.sha256(manifest.read_bytes())
    digest.update(json.dumps([list(image_shape), resize]).encode())
    return digest.hexdigest()


def decode_many(jobs: list, workers: int, ordered: bool = False):
    """Decode (index, path, shape, policy) jobs in `workers` processes, yielding (index, array or None,
    digest, error) as results come, or in the jobs' order if `ordered` (nothing accumulates)."""
    if workers <= 1:
        yield from map(_decode_job, jobs)
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(_decode_job, jobs, chunksize=16)


# ---- reading the cache -----------------------------------------------------------------------

@dataclass
class Split:
    """One split of the cache: uint8 images (memory-mapped, N×H×W×3) and integer labels."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as float images in [0, 1], (batch, 3, H, W) on `device`, and their labels."""
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows])).to(device, non_blocking=True)
        return to_float(images), torch.from_numpy(self.labels[rows]).to(device)


@dataclass
class Prepared:
    """A prepared cache, opened and checked: the record prepare wrote, its manifest and its images."""

    directory: Path
    classes: list[str]
    image_shape: tuple[int, int]
    resize: str
    data_hash: str
    table: pd.DataFrame
    images: np.ndarray  # memory-mapped, (rows, H, W, 3) uint8
    split_params: dict | None = None  # seed, val_fraction, test_fraction; None in caches older than the record

    def split(self, name: str) -> Split:
        """One split, read without decoding anything."""
        rows = self.table[self.table["split"] == name]
        if rows.empty:
            raise MixerError(f"prepared data in {self.directory} has no {name!r} images")
        index = rows["row"].to_numpy()
        # A contiguous copy for small data; a memory map view stays lazy for large data.
        subset = self.images[index] if self.images.nbytes < 2**30 else _LazyRows(self.images, index)
        return Split(subset, rows["label"].to_numpy(dtype=np.int64).copy(), list(rows["path"]), self.classes)


def open_prepared(cache: Path) -> Prepared:
    """Open a cache written by `prepare`, checking that its three files belong together."""
    cache = Path(cache)

    def damaged(why: str) -> MixerError:
        return MixerError(f"prepared data in {cache} is damaged ({why}); run `mixer prepare` again")

    for name in (INFO, MANIFEST, IMAGES):
        if not (cache / name).is_file():
            raise MixerError(f"prepared data is missing ({cache / name}); run `mixer prepare` first")
    try:
        info = json.loads((cache / INFO).read_text(encoding="utf-8"))
        classes, shape = list(info["classes"]), tuple(info["image_shape"])
        resize, data_hash = str(info["resize"]), str(info["data_hash"])
        table = pd.read_csv(cache / MANIFEST, keep_default_na=False,
                            dtype={"row": np.int64, "label": np.int64, "split": str, "path": str})
        images = np.load(cache / IMAGES, mmap_mode="r")
        if images.dtype != np.uint8 or images.shape != (info["rows"], *shape, 3):
            raise damaged(f"{IMAGES} holds {images.dtype} {list(images.shape)}; {INFO} says "
                          f"{info['rows']} RGB images of {list(shape)}")
        if _data_hash(cache / MANIFEST, shape, resize) != data_hash:
            raise damaged(f"{MANIFEST} is not the one {INFO} describes")
        if not set(table["split"]) <= set(SPLITS) or len(table) and (
                table["row"].min() < 0 or table["row"].max() >= len(images)
                or table["label"].min() < 0 or table["label"].max() >= len(classes)):
            raise damaged(f"{MANIFEST} does not match {IMAGES} and {INFO}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        raise damaged(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    split_params = info.get("split") if isinstance(info.get("split"), dict) else None
    return Prepared(cache, classes, shape, resize, data_hash, table, images, split_params)


def load_split(cache: Path, split: str) -> Split:
    """Read one split of a prepared cache without decoding anything."""
    return open_prepared(cache).split(split)


class _LazyRows:
    """Rows `index` of a memory-mapped array, read only when a batch asks for them."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, index
        self.shape = (len(index),) + array.shape[1:]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows):
        return self.array[self.index[rows]]
