"""Image sources → a decoded, split, memory-mappable cache that training reads without decoding again.

Sources: the embedded digits (written out as an image folder first, so it takes the user's path),
an image folder (one sub-folder per class), or a CSV (`path,label`, or the Kaggle dog-breed
`id,breed` with images at `<folder>/<id>.jpg`). Files are listed, sorted, decoded in parallel
worker processes and streamed into `images.npy`; the split is made on what decoded, per class,
seeded, so the same file lands in the same split on every run and machine.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from mixer.errors import MixerError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
SPLITS = ("train", "val", "test")


@dataclass
class Source:
    """What to decode: a data root and (path relative to it, class name) pairs."""

    root: Path
    items: list[tuple[str, str]]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)


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


def scan_folder(root: Path) -> Source:
    """One class per top-level sub-folder; images in nested folders belong to that class."""
    root = Path(root)
    if not root.exists():
        raise MixerError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise MixerError(f"data {root} is neither a folder nor a CSV file")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise MixerError(f"data folder {root} has no class sub-folders")
    items = []
    for name in classes:
        for (dirpath, dirnames, filenames) in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for filename in filenames:
                rel = (Path(dirpath) / filename).relative_to(root)
                if is_image_file(rel):
                    items.append((rel.as_posix(), name))
    return Source(root, sorted(items), classes)


def read_csv(csv: Path) -> Source:
    """`path,label` (paths relative to the CSV) or Kaggle's `id,breed` with `<id>.jpg` beside it."""
    csv = Path(csv)
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise MixerError(f"{csv} is not a readable CSV ({str(exc).splitlines()[0]})") from None
    root = csv.parent
    if {"path", "label"} <= set(table.columns):
        paths, labels = table["path"], table["label"]
    elif {"id", "breed"} <= set(table.columns):
        folder = next((d for d in (root / "train", root / "images", root) if d.is_dir()), root)
        prefix = folder.relative_to(root).as_posix()
        paths = [f"{prefix}/{i}.jpg" if prefix != "." else f"{i}.jpg" for i in table["id"]]
        labels = table["breed"]
    else:
        raise MixerError(f"{csv} needs columns path,label or id,breed; it has {','.join(table.columns)}")
    items, missing = [], []
    resolved_root = root.resolve()
    for (path, label) in zip(paths, labels):
        full = (root / path).resolve()
        if not full.is_relative_to(resolved_root):
            raise MixerError(f"{csv}: path {path!r} escapes the data folder {root}")
        if not label:
            raise MixerError(f"{csv}: {path!r} has an empty label")
        if not full.is_file():
            missing.append(path)
        items.append((Path(path).as_posix(), label))
    if missing:
        raise MixerError(f"{csv}: {len(missing)} labelled image(s) do not exist, e.g. {missing[0]!r}")
    return Source(root, sorted(items), sorted(set(labels)))


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
    """One file → (uint8 array H×W×3, hash of the full decoded pixels); raises ValueError if unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                image = to_rgb(ImageOps.exif_transpose(image))  # orientation before resizing
                digest = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
                return np.asarray(resize(image, shape, policy), dtype=np.uint8), digest
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise ValueError("not an image") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"cannot decode ({exc})") from None


def _decode_job(args):
    index, path, shape, policy = args
    try:
        array, digest = decode(path, shape, policy)
        return index, array, digest, None
    except ValueError as exc:
        return index, None, None, str(exc)


# ---- split -----------------------------------------------------------------------------------

def split_by_class(keys: list[str], labels: np.ndarray, val_fraction: float, test_fraction: float,
                   seed: int) -> np.ndarray:
    """A split name per item: per class, sorted by key, shuffled with `seed`, cut by the fractions.

    Depends only on the keys, labels and seed, never on listing order; every class keeps at least
    one training image, and classes of 3+ images get at least one test image.
    """
    out = np.empty(len(keys), dtype=object)
    for label in np.unique(labels):
        members = sorted(np.flatnonzero(labels == label), key=lambda i: keys[i])
        rng = np.random.default_rng([seed, int(label)])
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1 if n >= 3 else 0), n - 1)
        n_val = min(round(n * val_fraction), n - 1 - n_test)
        for (rank, i) in enumerate(members):
            out[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


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
    """Decode `source` into `out_dir` (images.npy, manifest.csv) and return the data report."""
    if len(source.classes) < 2:
        raise MixerError(f"data {source.root} has {len(source.classes)} class; at least 2 are needed")
    if config.num_classes is not None and config.num_classes != len(source.classes):
        raise MixerError(f"num_classes is {config.num_classes} but data {source.root} has "
                         f"{len(source.classes)} classes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = config.image_shape
    n = len(source.items)
    if n == 0:
        raise MixerError(f"data {source.root} has no images")
    # The .npy header first, then each image written at its row's offset: pages go to the file,
    # not to this process, so memory stays flat however large the data set.
    header = np.lib.format.open_memmap(out_dir / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, height, width, 3))
    offset, row_bytes = header.offset, height * width * 3
    del header
    digests: list[str | None] = [None] * n
    skipped = list(source.skipped)
    jobs = [(i, source.root / rel, config.image_shape, config.resize) for (i, (rel, _)) in enumerate(source.items)]
    with open(out_dir / "images.npy", "r+b") as cache:
        for (index, array, digest, error) in _run_jobs(jobs, workers):
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
    table.to_csv(out_dir / "manifest.csv", index=False)
    counts = {s: {c: int(((table["split"] == s) & (table["label_name"] == c)).sum()) for c in source.classes}
              for s in SPLITS}
    report = {
        "classes": source.classes,
        "counts": counts,
        "skipped": sorted(skipped, key=lambda d: d["path"]),
        "duplicates": duplicates,
        "duplicates_dropped": bool(config.drop_duplicates),
        "image_shape": list(config.image_shape),
    }
    (out_dir / "classes.json").write_text(json.dumps(source.classes, ensure_ascii=False) + "\n")
    return report


def _run_jobs(jobs: list, workers: int):
    """Decode in `workers` processes, yielding results as they come (nothing accumulates)."""
    if workers <= 1:
        yield from map(_decode_job, jobs)
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(workers) as pool:
        yield from pool.imap_unordered(_decode_job, jobs, chunksize=16)


_SPLIT_ORDER = {name: i for (i, name) in enumerate(SPLITS)}


def find_cross_split_duplicates(table: pd.DataFrame) -> list[dict]:
    """Images whose decoded content also appears in an earlier split (train < val < test).

    Each entry names the later copy (`path`, `split`) and the copy it duplicates (`same_as`).
    """
    out = []
    for (_, group) in table.groupby("hash", sort=True):
        if group["split"].nunique() < 2:
            continue
        group = group.assign(order=group["split"].map(_SPLIT_ORDER)).sort_values(["order", "path"])
        first = group.iloc[0]
        for (_, row) in group.iterrows():
            if row["split"] != first["split"]:
                out.append({"path": row["path"], "split": row["split"],
                            "same_as": first["path"], "same_as_split": first["split"]})
    return sorted(out, key=lambda d: d["path"])


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


def load_split(cache: Path, split: str) -> Split:
    """Read one split of a prepared cache without decoding anything."""
    cache = Path(cache)
    try:
        table = pd.read_csv(cache / "manifest.csv", keep_default_na=False)
        classes = json.loads((cache / "classes.json").read_text())
        images = np.load(cache / "images.npy", mmap_mode="r")
    except FileNotFoundError as exc:
        raise MixerError(f"prepared data is missing ({exc.filename}); run `mixer prepare` first") from None
    rows = table[table["split"] == split]
    if rows.empty:
        raise MixerError(f"prepared data in {cache} has no {split!r} images")
    index = rows["row"].to_numpy()
    # A contiguous copy for small data; a memory map view stays lazy for large data.
    subset = images[index] if images.nbytes < 2**30 else _LazyRows(images, index)
    return Split(subset, rows["label"].to_numpy(dtype=np.int64).copy(), list(rows["path"]), classes)


class _LazyRows:
    """Rows `index` of a memory-mapped array, read only when a batch asks for them."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, index
        self.shape = (len(index),) + array.shape[1:]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows):
        return self.array[self.index[rows]]
