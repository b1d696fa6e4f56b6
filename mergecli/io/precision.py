"""The precision a block of a merge needs, set per block by the streaming loop: a tensor written fp8 block-
scaled (3 mantissa bits) is read and merged in float32 where every other float32 tensor is merged in float64
(methods/average.py `accumulation_dtype`) and fp8 codes are decoded exactly (io/dequantize.py): a float32
merge is what its requantization starts from, and float64 would only cost time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


@contextmanager
def requantized(on: bool = True) -> Iterator[None]:
    """Within it, on this thread, the block being merged is requantized to fp8 as it is written."""
    before = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = before


def for_requantization() -> bool:
    """Whether the block being merged on this thread is requantized to fp8 as it is written."""
    return getattr(_state, "on", False)
