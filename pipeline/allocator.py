"""Keep freed memory inside the process, so large tensors do not page-fault afresh every step.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a new memory map and
gives it back to the kernel when freed; the next step's tensor of the same size then faults in
every page again. A Mixer at 256×256 allocates hidden activations of that size many times per
step: about 120,000 faults (470 MiB) a step at the original config. Told never to map and never
to trim, glibc reuses the freed heap instead, as the CUDA caching allocator does on a GPU.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory; False where the platform has no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # both return 1 on success; musl's stub returns 0 and changes nothing
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
