"""The prepared cache: a decoded, split, memory-mappable copy of a source that training reads without
decoding again (`prepare` writes it, `open_prepared` reads it back, checked).

The files of a source (`mixer.sources`) are decoded in parallel worker processes (`mixer.decoding`)
and streamed into `images.npy`; the split is made on what decoded, per class, seeded, so the same
file lands in the same split on every run and machine. `manifest.csv` lists each kept file's row,
label, split and pixel hash; `prepared.json` records the classes, shape, resize policy and one hash
of it all, which evaluation checks a model's training data against. `write_csv` writes the
manifest and the pipeline's CSV reports.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mixer.decoding import decode_many
from mixer.errors import MixerError
from mixer.hparams import Rule, at_least, check, hp, one_of
from mixer.preprocess import RESIZE_POLICIES, to_float
from mixer.sources import Source, printable
from mixer.split import SPLITS, find_cross_split_duplicates, find_label_conflicts, split_by_class
from mixer.text import spreadsheet_safe

IMAGES, MANIFEST, INFO = "images.npy", "manifest.csv", "prepared.json"  # the files of a prepared cache


# ---- prepare ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareConfig:
    image_shape: tuple[int, int]  # declared by MixerConfig, as seed by TrainConfig: both stages read them
    resize: str = hp("stretch", "stretch to image_shape, or center_crop after resizing the shorter side",
                     stages="prepare", rule=one_of(*RESIZE_POLICIES))
    val_fraction: float = hp(0.1, "share of each class held out for validation", stages="prepare",
                             rule=Rule("in (0, 1)", lambda v: 0 < v < 1))
    test_fraction: float = hp(0.2, "share of each class held out for the test", stages="prepare",
                              rule=Rule("in (0, 1)", lambda v: 0 < v < 1))
    seed: int = 0
    num_classes: int | None = hp(None, "number of classes the data must have (null: whatever it has)",
                                 stages="prepare train", rule=at_least(2), original=120)
    strict: bool = hp(False, "stop at an undecodable image instead of skipping and reporting it", stages="prepare")
    drop_duplicates: bool = hp(True, "drop images whose content already appears in an earlier split",
                               stages="prepare")

    def __post_init__(self):
        check(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise MixerError(f"val_fraction + test_fraction must leave a training share, got "
                             f"{self.val_fraction} + {self.test_fraction}")


def check_source(source: Source, config: PrepareConfig) -> None:
    """What the source must be for `config`, known before decoding anything (`mixer check` asks too)."""
    names = ", ".join(source.classes[:5]) + (", ..." if len(source.classes) > 5 else "")
    if len(source.classes) < 2:
        raise MixerError(f"data {printable(source.root)} has {len(source.classes)} class ({names or 'none'}); a "
                         "classifier needs at least 2: one sub-folder of images per class")
    if config.num_classes is not None and config.num_classes != len(source.classes):
        raise MixerError(f"num_classes is {config.num_classes} but data {printable(source.root)} has "
                         f"{len(source.classes)} classes ({names}); set num_classes: {len(source.classes)}, or null "
                         "to take it from the data")
    listing = pd.DataFrame({"path": [rel for (rel, _) in source.items],
                            "label_name": [label for (_, label) in source.items]})
    listing["label"] = listing["label_name"].map({name: i for (i, name) in enumerate(source.classes)})
    listing["split"] = _splits(source, listing, config)  # as prepare will split it, if every image decodes
    check_learnable(source, listing, config)
    if config.strict and source.label_conflicts:
        c = source.label_conflicts[0]
        raise MixerError(f"{source.root}: {c['path']!r} is labelled {' and '.join(map(repr, c['labels']))} "
                         f"(strict: true; {len(source.label_conflicts)} such path(s))")
    if config.strict and source.skipped:
        s = source.skipped[0]
        raise MixerError(f"{printable(source.root / s['path'])}: {s['reason']} (strict: true)")


def check_learnable(source: Source, table: pd.DataFrame, config: PrepareConfig,
                    dropped: Counter | None = None) -> None:
    """Every class has a training image and every split an image: else train or evaluate fails on a cache
    that prepare wrote. The rule's one home: `check_source` asks it of the listing (split as prepare will
    split it), `prepare` of what decoded, duplicates dropped (`dropped`: how many per split).

    split_by_class keeps a training image per class whenever it cuts, so a class without one comes from
    a given split (val/<class> without train/<class>) or from files that did not decode; train itself is
    never empty once every class has an image there.
    """
    decoded = dropped is not None
    root = printable(source.root)
    held = set(zip(table["label_name"], table["split"]))
    empty = [c for c in source.classes if not any((c, s) in held for s in SPLITS)]
    if empty and decoded:
        raise MixerError(f"class {empty[0]!r} in {source.root} has no usable image")
    if empty:
        raise MixerError(f"data {root}: class {empty[0]!r} has no images"
                         + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "") + "; add images or remove it")

    def folder(split: str) -> str:
        return source.split_folders.get(split, split) + "/"

    usable = "usable " if decoded else ""
    for name in source.classes:
        if (name, "train") not in held:
            where = folder(next(s for s in SPLITS if (name, s) in held))
            train = folder("train")
            raise MixerError(f"data {root}: class {name!r} has {usable}images in {where} but none in {train}, so it "
                             f"cannot be learned; add images to {train}{name}/ or remove {where}{name}/")
    for split in ("val", "test"):
        if split in {s for (_, s) in held}:
            continue
        if dropped and dropped[split]:
            raise MixerError(f"data {root}: the {split} split holds no image once its {dropped[split]} duplicate(s) "
                             "of images in an earlier split are dropped; add other images, or set drop_duplicates: "
                             "false")
        if split in source.given_splits:
            raise MixerError(f"data {root}: {folder(split)} holds no {usable}images; put images in "
                             f"{folder(split)}<class>/, or remove {folder(split)} to cut {split} from "
                             f"{folder('train')} by {split}_fraction")
        pool = table[~table["split"].isin(set(source.given_splits) - {"train"})]  # what the split is cut from
        fraction = getattr(config, f"{split}_fraction")
        largest = pool["label_name"].value_counts().max()
        raise MixerError(f"data {root}: {split}_fraction {fraction} leaves the {split} split empty (a class of n "
                         f"images gives about n × {fraction}, and the largest has {largest}); raise {split}_fraction, "
                         "or add images")


def prepare(source: Source, out_dir: Path, config: PrepareConfig, workers: int = 1,
            progress=None) -> dict:
    """Decode `source` into `out_dir` (images.npy, manifest.csv, prepared.json); returns the data report."""
    check_source(source, config)
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
    jobs = [(i, source.target(rel), config.image_shape, config.resize) for (i, (rel, _)) in enumerate(source.items)]
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
    conflicts = find_label_conflicts(table)  # the same content in two classes: one label is wrong
    if config.strict and conflicts:
        c = conflicts[0]
        other = next(i for (i, label) in enumerate(c["copy_labels"]) if label != c["copy_labels"][0])
        raise MixerError(f"{printable(source.root)}: {c['copies'][0]!r} and {c['copies'][other]!r} hold the same "
                         f"image, labelled {c['copy_labels'][0]!r} and {c['copy_labels'][other]!r} (strict: true; "
                         f"{len(conflicts)} such image(s)); keep only the copy in the right class")
    table["split"] = _splits(source, table, config)
    duplicates = find_cross_split_duplicates(table)
    if config.drop_duplicates and duplicates:
        dropped = {d["path"] for d in duplicates}
        table = table[~table["path"].isin(dropped)].reset_index(drop=True)
    check_learnable(source, table, config, dropped=Counter(d["split"] for d in duplicates if config.drop_duplicates))
    write_csv(table, out_dir / MANIFEST, spreadsheet=False)  # read back by open_prepared: names as they are
    counts = {s: {c: int(((table["split"] == s) & (table["label_name"] == c)).sum()) for c in source.classes}
              for s in SPLITS}
    info = {"classes": source.classes, "image_shape": list(config.image_shape), "resize": config.resize,
            "rows": n, "data_hash": _data_hash(out_dir / MANIFEST, config.image_shape, config.resize),
            # what made the split: the hash covers its outcome, these let a mismatch be explained
            "split": {"seed": config.seed, "val_fraction": config.val_fraction, "test_fraction": config.test_fraction,
                      **({"given": list(source.given_splits)} if source.given_splits else {})}}
    (out_dir / INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return {
        "classes": source.classes,
        "counts": counts,
        "skipped": sorted(skipped, key=lambda d: d["path"]),
        "duplicates": duplicates,
        "duplicates_dropped": bool(config.drop_duplicates),
        "label_conflicts": source.label_conflicts + conflicts,  # a CSV path given two labels; an image in two classes
        "duplicate_rows": source.duplicate_rows,
        "image_shape": list(config.image_shape),
        "resize": config.resize,
        "data_hash": info["data_hash"],
    }


def _splits(source: Source, table: pd.DataFrame, config: PrepareConfig) -> np.ndarray:
    """Each image's split: seeded per class by the fractions; in a pre-split folder, its folder's, the
    splits it lacks cut from train/ by their fractions (val_fraction and test_fraction of train/)."""
    keys, labels = list(table["path"]), table["label"].to_numpy()
    if not source.given_splits:
        return split_by_class(keys, labels, config.val_fraction, config.test_fraction, config.seed)
    out = np.array([source.split_of(k) for k in keys], dtype=object)
    for split in ("val", "test"):
        if split not in source.given_splits:  # cut from train/, asking split_by_class for it as its "test"
            train = np.flatnonzero(out == "train")
            fraction = config.val_fraction if split == "val" else config.test_fraction
            cut = split_by_class([keys[i] for i in train], labels[train], 0.0, fraction, config.seed)
            out[train[cut == "test"]] = split
    return out


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

    def gather(self, rows: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as they are stored (uint8, batch×H×W×3) and their labels, on the host; in pinned memory when
        `pin`, so that a copy to a GPU can run while the GPU works."""
        images, labels = torch.from_numpy(np.ascontiguousarray(self.images[rows])), torch.from_numpy(self.labels[rows])
        return (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)

    @staticmethod
    def on_device(images: torch.Tensor) -> torch.Tensor:
        """Gathered rows, once on the training device, as the model's input: float (batch, 3, H, W) in [0, 1]."""
        return to_float(images)

    def batch(self, rows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as float images in [0, 1], (batch, 3, H, W) on `device`, and their labels."""
        images, labels = self.gather(rows)
        return self.on_device(images.to(device)), labels.to(device)


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
