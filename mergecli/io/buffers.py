"""Reusable byte buffers for the streaming loop.

A fresh buffer per block costs an mmap, a page fault per 4 KB page and an munmap: for a merge of
tens of GB that is seconds of kernel time. Blocks are read into, and merged into, buffers that are
recycled instead.
"""

from __future__ import annotations

import math
import threading

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


_per_thread = threading.local()  # each streaming thread's buffers, reused from block to block


def thread_buffer(key: object, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor of this thread's for `key`: no allocation per block, and no sharing between the
    threads that merge blocks side by side. Valid until this thread asks for `key` again."""
    buffers = getattr(_per_thread, "buffers", None)
    if buffers is None:
        buffers = _per_thread.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]
