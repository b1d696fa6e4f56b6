"""Giving freed memory back to the operating system between the stages of a long computation.

glibc keeps freed blocks below its mmap threshold (up to 32 MB, adjusted upwards as the program
frees large blocks) in its heap, fragmented; block after block of weights and Gram sums then look
like growing memory. `give_back_memory` asks it to return what is free (a no-op elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    return getattr(library, "malloc_trim", None)


def give_back_memory() -> None:
    """Return the heap's free memory to the operating system (glibc's malloc_trim)."""
    trim = _trim()
    if trim is not None:
        trim(0)
