"""The k largest magnitudes of a population of values streamed in row blocks, exactly, in memory that
does not grow with the population: TIES' trim, per tensor or over a model's whole task vector.

Non-negative float32 numbers sort as their bit patterns do, read as integers. A first streamed pass
counts the top 16 bits of every |x| (65,536 buckets); the bucket that holds the k-th largest is
found from the counts. A second pass counts the low 16 bits of the values in that bucket alone,
which gives the k-th largest value t exactly, with how many values exceed it. When values equal to
t are more than the ones still to keep, a third pass counts them per block, so that the first ones
by position are kept: exactly k values, whatever the block size or the number of threads.
"""

from __future__ import annotations

import math
import threading

import torch

_BUCKETS = 1 << 16


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """|x| of float32 values as int32 bit patterns, which order as the magnitudes do (flat)."""
    return values.reshape(-1).abs().to(torch.float32).view(torch.int32)


class TopMagnitudes:
    """Which entries of a population of `size` values are its ⌊density × size⌋ largest magnitudes.

    Fed block by block, three times at most: `count` in pass 0 and 1 (and 2, for ties), then `keep`
    answers for each block. Thread-safe; every block is known by the flat position of its first
    element in the population (`start`).
    """

    def __init__(self, size: int, density: float):
        self.size = size
        self.k = min(size, math.floor(density * size))
        self.stage = 0  # 0: top bits, 1: low bits in the bucket, 2: ties per block, 3: done
        self.lock = threading.Lock()
        self.counts: torch.Tensor | None = torch.zeros(_BUCKETS, dtype=torch.int64) if 0 < self.k < size else None
        self.bucket = 0  # the top 16 bits of the k-th largest value
        self.above = 0  # values above the current bucket (stage 1), above the threshold (after)
        self.threshold = -1  # the k-th largest value's bits
        self.ties_kept = 0  # how many values equal to the threshold are kept (the first ones by position)
        self.ties: dict[int, int] = {}  # block start → values equal to the threshold in it (stage 2)
        self.tie_offsets: dict[int, int] = {}  # block start → such values before it, by position
        if self.counts is None:
            self.stage = 3

    @property
    def breaks_ties(self) -> bool:
        """Whether the values equal to the threshold are more than those kept (a third pass is needed)."""
        return self.stage == 2

    def count(self, bits: torch.Tensor, start: int) -> None:
        """Fold one block's magnitude bits into the current pass's counts."""
        if self.stage == 0:
            part = torch.bincount((bits >> 16).to(torch.int64), minlength=_BUCKETS)
        elif self.stage == 1:
            inside = bits[(bits >> 16) == self.bucket]
            part = torch.bincount((inside & 0xFFFF).to(torch.int64), minlength=_BUCKETS)
        elif self.stage == 2:
            ties = int((bits == self.threshold).sum())
            with self.lock:
                self.ties[start] = ties
            return
        else:
            return
        with self.lock:
            self.counts += part

    def finish_pass(self) -> None:
        """Every block was counted: settle the bucket, then the threshold, then the tie offsets."""
        if self.stage == 0:
            self.bucket, self.above = self._find(self.k)
            self.counts.zero_()
            self.stage = 1
        elif self.stage == 1:
            low, above_in_bucket = self._find(self.k - self.above)
            self.threshold = (self.bucket << 16) | low
            equal = int(self.counts[low])
            self.above += above_in_bucket
            self.ties_kept = self.k - self.above
            self.counts = None
            self.stage = 2 if self.ties_kept < equal else 3
        elif self.stage == 2:
            seen = 0
            for start in sorted(self.ties):
                self.tie_offsets[start] = seen
                seen += self.ties[start]
            self.ties = {}
            self.stage = 3

    def _find(self, rank: int) -> tuple[int, int]:
        """(the bucket holding the `rank`-th largest of the counted values, how many lie above it)."""
        from_top = torch.flip(self.counts, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor([rank]), right=False))
        above = int(from_top[index - 1]) if index else 0
        return _BUCKETS - 1 - index, above

    def keep(self, bits: torch.Tensor, start: int) -> torch.Tensor:
        """The mask (flat, bool) of a block's values that are among the k largest."""
        if self.k == 0:
            return torch.zeros_like(bits, dtype=torch.bool)
        if self.k == self.size:
            return torch.ones_like(bits, dtype=torch.bool)
        kept = bits > self.threshold
        equal = bits == self.threshold
        if self.tie_offsets:  # the first `ties_kept` equal values by position
            order = torch.cumsum(equal, 0) + self.tie_offsets[start]
            return kept | (equal & (order <= self.ties_kept))
        return kept | equal
