"""Reusable byte buffers for the streaming loop.

A fresh buffer per block costs an mmap, a page fault per 4 KB page and an munmap: for a merge of
tens of GB that is seconds of kernel time. Blocks are read into, and merged into, buffers that are
recycled instead.
"""

from __future__ import annotations

import math

import torch


class ScratchBuffers:
    """Named uint8 buffers that grow to the largest request and are then reused."""

    def __init__(self) -> None:
        self._buffers: dict[object, torch.Tensor] = {}

    def get(self, key: object, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly `nbytes`, sharing memory with earlier requests for `key`."""
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes]

    def tensor(self, key: object, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of `shape` and `dtype` in the buffer for `key`."""
        return self.get(key, math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


class BufferRing:
    """`slots` sets of scratch buffers used in turn, for a producer that runs ahead of its consumer.

    With a queue of depth D between them, the producer fills at most D + 1 sets while the consumer
    holds one, so D + 2 slots never hand out a set that is still in use.
    """

    def __init__(self, slots: int) -> None:
        self._slots = [ScratchBuffers() for _ in range(slots)]
        self._next = 0

    def next(self) -> ScratchBuffers:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        return slot
