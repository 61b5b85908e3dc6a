"""Image files → uint8 RGB arrays of one shape, in parallel worker processes, memory bounded.

Any PIL mode becomes RGB (alpha composited on white), EXIF orientation is applied, and a file much
larger than the target is shrunk while it decodes; `decode_many` runs the files of a prepared cache
or of `mixer predict` through worker processes, streaming results as they come. A file may also be a
`Member` of a zip or tar archive (`mixer.sources.scan_archive` lists them): each process opens the
archive once and reads the member from it, nothing is unpacked to disk.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import multiprocessing
import os
import stat
import tarfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mixer.files import file_kind

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# An archive member up to this size is read into memory whole (PIL seeks in it freely); a larger one is read
# through a window on the archive's stream, so a member that declares a huge size (a decompression bomb) is
# never inflated: PIL reads its header and the pixel limit refuses it, as for a file.
MEMBER_IN_MEMORY = 64 * 2**20


class Member(NamedTuple):
    """One regular-file member of a zip or tar archive, as the decoding workers find it again."""

    archive: str  # the archive's absolute path
    kind: str     # "zip" or "tar"
    name: str     # the member's name as the archive lists it (what zipfile opens)
    offset: int   # zip: its local header's offset; tar: where its data starts in the (decompressed) tar stream
    size: int     # its declared (uncompressed) size in bytes


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: palette, alpha (on a white background), L, 16-bit, CMYK."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":  # 32-bit float: [0, 1] (the scientific convention, else all black) or [0, 255]
        array = np.asarray(image, dtype=np.float64)
        finite = array[np.isfinite(array)]
        # [0, 1] when nearly every pixel is (a stray hot pixel or NaN must not turn the image black)
        unit = finite.size > 0 and np.percentile(finite, 99) <= 1.0 and np.percentile(finite, 1) >= -1e-3
        scale = 255.0 if unit else 1.0
        array = np.nan_to_num(array, nan=0.0, posinf=1.0 if unit else 255.0, neginf=0.0)
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


def decode(path: Path | Member, shape: tuple[int, int], policy: str = "stretch") -> tuple[np.ndarray, str]:
    """One file or archive member → (uint8 array H×W×3, hash of the decoded pixels); raises ValueError if
    unusable.

    Only a regular file is read (it is opened without blocking, so a FIFO cannot hang us). Memory is
    bounded by the pixel limit (`Image.MAX_IMAGE_PIXELS`, about 89 M pixels; more is refused as a
    decompression bomb): a JPEG much larger than `shape` is decoded at a reduced scale, any other
    image is shrunk by whole factors before its colours are converted. A `Member` gives the same
    array and hash as the same bytes in a file.
    """
    if isinstance(path, Member):
        return _decode_open(open_member(path), shape, policy)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError(f"cannot open ({exc.strerror})") from None
    file = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        file.close()
        raise ValueError(f"not a regular file ({file_kind(mode) if not stat.S_ISDIR(mode) else 'folder'})")
    return _decode_open(file, shape, policy)


def _decode_open(file, shape: tuple[int, int], policy: str) -> tuple[np.ndarray, str]:
    """Decode an open binary file-like (closed after), mapping every way it can fail to ValueError."""
    with file, warnings.catch_warnings():
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
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError) as exc:  # a large member read through, not whole
            raise ValueError(f"cannot read from the archive ({exc})") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"cannot decode ({exc})") from None


# Archives this process has open, by (process id, path): each worker opens an archive once, never sharing a
# descriptor (and so a file offset) with the process it was forked from.
_ARCHIVES: dict[tuple[int, str], zipfile.ZipFile | tarfile.TarFile] = {}


def _archive(member: Member):
    key = (os.getpid(), member.archive)
    if key not in _ARCHIVES:
        try:
            _ARCHIVES[key] = zipfile.ZipFile(member.archive) if member.kind == "zip" else \
                tarfile.open(member.archive, "r:*")
        except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, ValueError, zlib.error,
                lzma.LZMAError) as exc:
            raise ValueError(f"cannot open the archive ({getattr(exc, 'strerror', None) or exc})") from None
    return _ARCHIVES[key]


def close_archives() -> None:
    """Close the archives this process opened (those of a process it was forked from are not its own)."""
    for key in [k for k in _ARCHIVES if k[0] == os.getpid()]:
        _ARCHIVES.pop(key).close()


def open_member(member: Member):
    """A binary file-like holding the member's bytes: in memory up to MEMBER_IN_MEMORY, else a window on the
    archive (which stays open in this process until `close_archives`); ValueError if it cannot be read."""
    archive = _archive(member)
    try:
        if member.kind == "zip":
            stream = archive.open(member.name)
        else:
            stream = io.BufferedReader(_Window(archive.fileobj, member.offset, member.size))
        if member.size > MEMBER_IN_MEMORY:
            return stream
        with stream:
            data = stream.read(member.size + 1)
    except KeyError:
        raise ValueError("no longer in the archive (it changed since it was listed)") from None
    except (RuntimeError, NotImplementedError) as exc:  # zipfile: encrypted, or a compression method it lacks
        raise ValueError(f"cannot read from the archive ({exc})") from None
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"cannot read from the archive ({exc})") from None
    if len(data) != member.size:
        raise ValueError(f"cannot read from the archive ({len(data)} bytes where it declares {member.size}: "
                         "truncated or damaged)")
    return io.BytesIO(data)


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a seekable stream (a tar's, decompressed), as a file of their own."""

    def __init__(self, stream, start: int, size: int):
        self.stream, self.start, self.size, self.pos = stream, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if n == 0:
            return 0
        self.stream.seek(self.start + self.pos)
        data = self.stream.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


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


def _read_order(job) -> tuple:
    target = job[1]
    return (target.archive, target.offset) if isinstance(target, Member) else ("", 0)


def decode_many(jobs: list, workers: int, ordered: bool = False):
    """Decode (index, path or Member, shape, policy) jobs in `workers` processes, yielding (index, array or
    None, digest, error) as results come, or in the jobs' order if `ordered` (nothing accumulates).

    Unordered, archive members are read in their order in the archive, so each worker reads a compressed
    tar forward (a backward seek in a gzip stream decompresses it again from the start)."""
    if not ordered and any(isinstance(job[1], Member) for job in jobs):
        jobs = sorted(jobs, key=_read_order)
    if workers <= 1:
        try:
            yield from map(_decode_job, jobs)
        finally:
            close_archives()
        return
    context = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    with context.Pool(workers) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(_decode_job, jobs, chunksize=16)
