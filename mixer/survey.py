"""What a data source holds, told before any decoding: images per class, and the sizes and colour modes of
a sample of images (read from their headers), against the image_shape they will be resized to.

`mixer check` prints it, so a folder of 28×28 grey photos that the digits' settings would shrink to
12×12, or 3000-pixel photos that would become 12 pixels, is said before an hour of training.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import numpy as np
from PIL import Image

from mixer.sources import Source

SAMPLE = 200          # headers read, spread evenly over the sorted listing (so over the classes)
FAR = 2.0             # a resize by more than this per side is said


@dataclass
class Survey:
    classes: int
    images: int
    per_class: tuple[int, int, int]            # min, median, max
    sizes: list[tuple[int, int]] = field(default_factory=list)   # (height, width) of the sample that opened
    modes: Counter = field(default_factory=Counter)
    unreadable: int = 0

    def typical(self) -> tuple[int, int] | None:
        """The sample's median height and width."""
        if not self.sizes:
            return None
        return (int(statistics.median(h for (h, _) in self.sizes)), int(statistics.median(w for (_, w) in self.sizes)))

    def lines(self, image_shape: tuple[int, int]) -> list[str]:
        """One line describing the data; a second when image_shape is far from the images' typical size."""
        (low, mid, high) = self.per_class
        text = (f"data: {self.classes} classes, {self.images} images ({low} to {high} per class, median {mid})")
        typical = self.typical()
        if typical is None:
            return [text]
        heights, widths = [h for (h, _) in self.sizes], [w for (_, w) in self.sizes]
        modes = ", ".join(f"{m} {n}" for (m, n) in self.modes.most_common())
        text += (f"; a sample of {len(self.sizes)}: typically {typical[0]}×{typical[1]} (heights {min(heights)} to "
                 f"{max(heights)}, widths {min(widths)} to {max(widths)}), modes {modes}")
        out = [text]
        factor = max(typical[0] / image_shape[0], typical[1] / image_shape[1],
                     image_shape[0] / typical[0], image_shape[1] / typical[1])
        if factor > FAR:
            way = "shrinks" if typical[0] * typical[1] > image_shape[0] * image_shape[1] else "enlarges"
            out.append(f"note: image_shape {list(image_shape)} {way} these images about {factor:.1f}× per side; "
                       f"to train near their size set image_shape (and a patch_shape that divides it), "
                       f"e.g. {advice(typical)}")
        return out


def advice(typical: tuple[int, int]) -> str:
    """A preset or the keys to change for images of about this size."""
    side = max(typical)
    if side <= 40:
        return (f"presets/small-grey.yaml (32×32, patch 4) or image_shape [{_round(typical[0], 4)}, "
                f"{_round(typical[1], 4)}] with patch_shape [4, 4]")
    if side <= 160:
        return "presets/photos-cpu.yaml (64×64, patch 8)"
    return "presets/photos-cpu.yaml (64×64, patch 8) on a CPU, presets/photos-gpu.yaml (224×224, S/16) on a GPU"


def _round(side: int, patch: int) -> int:
    return max(patch, round(side / patch) * patch)


def survey(source: Source, opener: Callable[[str], BinaryIO] | None = None, sample: int = SAMPLE) -> Survey:
    """Count the source's images per class and read the headers of up to `sample` of them (`opener`: how
    to open an item's relative path for reading; by default the file under the source's root)."""
    counts = Counter(label for (_, label) in source.items)
    per = sorted(counts[c] for c in source.classes) or [0]
    result = Survey(len(source.classes), len(source.items), (per[0], int(statistics.median(per)), per[-1]))
    if not source.items:
        return result
    opener = opener or source.open  # a file under the folder, or a member of the archive
    picks = np.unique(np.linspace(0, len(source.items) - 1, min(sample, len(source.items))).astype(int))
    for index in picks:
        try:
            with opener(source.items[index][0]) as f, Image.open(f) as image:  # the header only: no pixels
                result.sizes.append((image.height, image.width))
                result.modes[image.mode] += 1
        except Exception:  # noqa: BLE001 (any reader error: prepare reports the file; here it is only not counted)
            result.unreadable += 1
    return result
