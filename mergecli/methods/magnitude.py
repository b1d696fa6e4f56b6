"""The k largest magnitudes of a population of values streamed in row blocks, exactly, in memory that
does not grow with the population: TIES' trim, per tensor or over a model's whole task vector.

A large population is first sampled and bracketed, then settled in one pass (methods/bracket.py); a
small one, or one the bracket misses, is counted by the exact histogram passes described here.

Non-negative float32 numbers sort as their bit patterns do, read as integers. A first streamed pass
counts the top 16 bits of every |x| (65,536 buckets); the bucket that holds the k-th largest is
found from the counts. A second pass counts the low 16 bits of the values in that bucket alone,
which gives the k-th largest value t exactly, with how many values exceed it. When values equal to
t are more than the ones still to keep, the first ones by position are kept: exactly k values,
whatever the block size or the number of threads. For that, each block's count of them is needed:
the second pass keeps each block's counts of the bucket's low bits (a few hundred numbers a block,
up to a budget) and reads it off there; past the budget, a third pass counts them.

Only the populations being counted hold counts (256 KB each, and the store).
"""

from __future__ import annotations

import math
import threading

import torch

from mergecli.io.buffers import thread_buffer
from mergecli.methods import bracket
from mergecli.methods.bracket import Bracket, Sample, SamplePlan, magnitudes

SAMPLE, BRACKET, TOP, LOW, TIES, DONE = range(6)  # the stages of a trim, each a streamed pass but the last
_BUCKETS = 1 << 16
STORE_ENTRIES = 2**21  # per population: the bucket's low bits per block kept in the second pass (16 MB)


def _as_float(bits: int) -> float:
    """The float32 value of a bit pattern (`bits - 1` of a positive one: the float32 just below it)."""
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


class TopMagnitudes:
    """Which entries of a population of `size` values are its ⌊density × size⌋ (or `k`) largest magnitudes.

    Fed block by block, one pass per stage (`count`, then `finish_pass` once every block of the pass was
    counted): SAMPLE and BRACKET for a population with a `sample` plan (what its sample pass reads), then
    TOP, LOW and TIES when needed; then `trim_` zeroes each block's others. Thread-safe; every block is
    known by the flat position of its first element in the population (`start`).
    """

    def __init__(self, size: int, density: float, store_entries: int = STORE_ENTRIES,
                 sample: SamplePlan | None = None, k: int | None = None):
        self.size = size
        self.k = min(size, math.floor(density * size) if k is None else k)
        counted = 0 < self.k < size
        self.sample = Sample(sample, size) if counted and sample is not None and size >= bracket.MIN_SAMPLED else None
        self.bracket: Bracket | None = None
        self.stage = DONE if not counted else SAMPLE if self.sample is not None else TOP
        self.lock = threading.Lock()
        self.counts: torch.Tensor | None = None  # this pass's, from the first block counted to its end
        self.bucket = 0  # the top 16 bits of the k-th largest value
        self.above = 0  # values above the current bucket (LOW), above the threshold (after)
        self.threshold = -1  # the k-th largest value's bits
        self.ties_kept = 0  # how many values equal to the threshold are kept (the first ones by position)
        self.ties: dict[int, int] = {}  # block start → values equal to the threshold in it
        self.tie_offsets: dict[int, int] = {}  # block start → such values before it, by position
        self.store_left = store_entries  # room left in `lows`
        self.lows: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {}  # LOW: block → (low bits, counts)

    def memory(self) -> int:
        """The most bytes this trim holds while it is counted: its sample and its bracket's values, or
        its histogram and the bucket's low bits per block."""
        if self.sample is not None:
            return 4 * (self.sample.entries + bracket.bracket_entries(self.size))
        return 8 * _BUCKETS + 8 * self.store_left if self.stage != DONE else 0

    def expected_passes(self) -> tuple[int, ...]:
        """The passes this trim is expected to take from its current stage (others run only when a
        bracket misses, or to count ties per block past the store)."""
        return (SAMPLE, BRACKET) if self.stage == SAMPLE else (TOP, LOW) if self.stage == TOP else ()

    def count(self, vector: torch.Tensor, start: int) -> None:
        """Fold the magnitudes of one block of values into the current pass's counts."""
        if self.stage == DONE:
            return
        if self.stage == SAMPLE:
            self.sample.add(magnitudes(vector).view(torch.int32))
            return
        if self.stage == BRACKET:
            self.bracket.count(vector, start)
            return
        bits = magnitudes(vector).view(torch.int32)
        if self.stage == TIES:
            ties = int((bits == self.threshold).sum())
            with self.lock:
                self.ties[start] = ties
            return
        bins = thread_buffer("bins", bits.numel(), torch.int32)
        if self.stage == TOP:
            part = torch.bincount(torch.bitwise_right_shift(bits, 16, out=bins), minlength=_BUCKETS)
            self._add(part)
            return
        # the low bits of the values in the bucket, as bins 1..65536; the others fall in 0 or 65537
        torch.sub(bits, (self.bucket << 16) - 1, out=bins).clamp_(0, _BUCKETS + 1)
        part = torch.bincount(bins, minlength=_BUCKETS + 2)[1:_BUCKETS + 1]
        lows = part.nonzero().view(-1)
        self._add(part, start, (lows.to(torch.int32), part[lows].to(torch.int32)))

    def _add(self, part: torch.Tensor, start: int = 0, lows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        with self.lock:
            if self.counts is None:
                self.counts = torch.zeros(_BUCKETS, dtype=torch.int64)
            self.counts += part
            if lows is not None and self.lows is not None:
                self.store_left -= lows[0].numel()
                if self.store_left < 0:
                    self.lows = None  # past the budget: a third pass will count the ties
                else:
                    self.lows[start] = lows

    def finish_pass(self) -> None:
        """Every block was counted: settle the bracket (or the bucket, then the threshold), then the tie
        offsets."""
        if self.stage == SAMPLE:
            self.bracket = self.sample.bracket(self.size, self.k)
            self.sample = None
            self.stage = BRACKET if self.bracket is not None else TOP
        elif self.stage == BRACKET:
            settled = self.bracket.settle(self.k)
            self.bracket = None
            if settled is None:
                self.stage = TOP  # the bracket missed: the exact passes count it
                return
            self.threshold, self.above = settled.threshold, settled.above
            self.ties_kept = self.k - self.above
            self.stage = DONE
            if self.ties_kept < settled.equal:
                self.ties = settled.ties
                self._settle_ties()
        elif self.stage == TOP:
            self.bucket, self.above = self._find(self.k)
            self.counts = None
            self.stage = LOW
        elif self.stage == LOW:
            low, above_in_bucket = self._find(self.k - self.above)
            self.threshold = (self.bucket << 16) | low
            equal = int(self.counts[low])
            self.above += above_in_bucket
            self.ties_kept = self.k - self.above
            self.counts = None
            self.stage = TIES if self.ties_kept < equal else DONE
            if self.stage == TIES and self.lows is not None:  # each block's ties, from its stored counts
                for start, (lows, counts) in self.lows.items():
                    self.ties[start] = int(counts[lows == low].sum())
                self._settle_ties()
            self.lows = None
        elif self.stage == TIES:
            self._settle_ties()

    def _settle_ties(self) -> None:
        seen = 0
        for start in sorted(self.ties):
            self.tie_offsets[start] = seen
            seen += self.ties[start]
        self.stage = DONE

    def _find(self, rank: int) -> tuple[int, int]:
        """(the bucket holding the `rank`-th largest of the counted values, how many lie above it)."""
        from_top = torch.flip(self.counts, [0]).cumsum(0)
        index = int(torch.searchsorted(from_top, torch.tensor([rank]), right=False))
        above = int(from_top[index - 1]) if index else 0
        return _BUCKETS - 1 - index, above

    def trim_(self, vector: torch.Tensor, start: int) -> torch.Tensor:
        """Zero, in place, the entries of a block (flat) that are not among the k largest magnitudes."""
        if self.k == self.size:
            return vector
        if self.k == 0:
            return vector.zero_()
        threshold = _as_float(self.threshold)
        before = self.tie_offsets.get(start, 0)  # values equal to the threshold before this block
        keeps_ties = before + self.ties.get(start, 0) <= self.ties_kept
        if not math.isfinite(threshold) or (not keeps_ties and before < self.ties_kept):
            bits = magnitudes(vector).view(torch.int32)
            return vector.mul_(self._kept_by_position(bits, start))  # the cut is in this block
        if vector.dtype == torch.float32:  # one pass: hardshrink keeps x where |x| > λ, else gives 0
            if keeps_ties and self.threshold == 0:
                return vector  # every |x| ≥ 0
            return torch.hardshrink(vector, _as_float(self.threshold - 1) if keeps_ties else threshold, out=vector)
        found = magnitudes(vector)
        # |x| − t is > 0 exactly where |x| > t, and 0 where equal (float subtraction of unequal values never
        # gives 0): its sign, then +1 and at most 1 (equal ones kept) or at least 0 (dropped), is the 0/1
        # mask, in float arithmetic (several times faster on a CPU than comparisons giving bool masks)
        mask = found.sub_(threshold).sign_()
        return vector.mul_(mask.add_(1).clamp_(max=1) if keeps_ties else mask.clamp_(min=0))

    def _kept_by_position(self, bits: torch.Tensor, start: int) -> torch.Tensor:
        """The mask (bool) of the values above the threshold, and of the first `ties_kept` equal to it."""
        kept = bits > self.threshold
        equal = bits == self.threshold
        if self.tie_offsets:
            order = torch.cumsum(equal, 0) + self.tie_offsets[start]
            return kept | (equal & (order <= self.ties_kept))
        return kept | equal
