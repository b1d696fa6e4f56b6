"""Statistics of whole tensors from streamed row blocks: sums (norms, dot products, counts) folded block
by block in float64 and added in block order, so that they come out the same for any number of threads
and any block size that splits the same rows; and the Gram matrix of a block's vectors, the statistic
most methods on the sphere need.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from mergecli.io.buffers import thread_buffer
from mergecli.methods.base import Prepass

# (a block's input blocks, every source's, in the task's order; its first element's flat position) →
# the block's part of the sums, a float64 tensor of any fixed shape
Fold = Callable[[list[torch.Tensor], int], torch.Tensor]


class Sums(Prepass):
    """One streamed pass that adds up `fold`'s part of every row block of a tensor; once all are in,
    `total` holds the sum and `then(total)` runs (what the combine needs is computed there, once)."""

    def __init__(self, label: str, fold: Fold, then: Callable[[torch.Tensor], None] | None = None):
        self.label = label
        self.sums = fold
        self.then = then
        self.parts: dict[int, torch.Tensor] = {}  # block start → its part
        self.lock = threading.Lock()
        self.total: torch.Tensor | None = None

    def needed(self) -> bool:
        return True

    def fold(self, blocks: list[torch.Tensor], start: int) -> None:
        part = self.sums(blocks, start)
        with self.lock:
            self.parts[start] = part

    def task_done(self) -> None:
        total = None
        for start in sorted(self.parts):  # block order: the same sum for any number of threads
            total = self.parts[start].clone() if total is None else total.add_(self.parts[start])
        self.parts = {}
        self.total = total
        if self.then is not None:
            self.then(total)


def gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """⟨v_i, v_j⟩ of a block's vectors (flat, of one length), in float64: a K × K matrix."""
    size = vectors[0].numel()
    stacked = thread_buffer("gram", len(vectors) * size, torch.float64).view(len(vectors), size)
    for row, vector in zip(stacked, vectors):
        row.copy_(vector.reshape(-1))
    return stacked @ stacked.T


def row_view(block: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A row block of a tensor of `shape` as (vectors, last dimension): the vectors along its last dimension
    (a 1-D tensor is one vector)."""
    return block.reshape(-1, shape[-1]) if len(shape) > 1 else block.reshape(1, -1)
