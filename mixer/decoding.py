"""Image files → uint8 RGB arrays of one shape, in parallel worker processes, memory bounded.

Any PIL mode becomes RGB (alpha composited on white), EXIF orientation is applied, and a file much
larger than the target is shrunk while it decodes; `decode_many` runs the files of a prepared cache
or of `mixer predict` through worker processes, streaming results as they come.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mixer.files import file_kind

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette, alpha (on a white background), L, 16-bit, CMYK."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":  # 32-bit float: [0, 1] (the scientific convention, else all black) or [0, 255]
        array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if array.size and array.min() >= 0 and array.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
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


def decode_many(jobs: list, workers: int, ordered: bool = False):
    """Decode (index, path, shape, policy) jobs in `workers` processes, yielding (index, array or None,
    digest, error) as results come, or in the jobs' order if `ordered` (nothing accumulates)."""
    if workers <= 1:
        yield from map(_decode_job, jobs)
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(_decode_job, jobs, chunksize=16)
