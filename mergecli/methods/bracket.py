"""The k-th largest magnitude of a large population in two streamed reads instead of three: a sample
of its rows brackets the value, and one pass counts what lies above the bracket and keeps what lies in
it, which settles the k-th largest exactly.

The sample reads a share of the rows of every group of row blocks (a slab at a place that depends on
the group, not always its first rows: weights often repeat a pattern every head or every block), at
least one row, and keeps every `stride`-th magnitude of it: about `sample_size(n)` of a population of
n, as many as keep the bracket within `BRACKET_ENTRIES / 2` values. The bracket is the sample's k-th
largest widened by `Z` standard errors of its rank, estimated from how much the slabs differ from each
other (so rows that resemble each other widen it, as they should), and never less than what
independent draws would give.

The pass over the bracket needs float arithmetic and one compaction a block: hardshrink at the top of
the bracket keeps what lies above it (counted), hardshrink at its bottom minus that keeps what lies in
it (stored, as bit patterns, block by block, where that difference is not 0). A bracket that
misses the k-th value (its count says so), a store that would overflow, or values that are not
numbers, send the population back to the exact histogram passes (methods/magnitude.py): the result
never depends on the sample, only the time does.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
import torch

from mergecli.io.buffers import thread_buffer

MIN_SAMPLED = 2**20  # a smaller population is counted by the exact passes (they cost little there)
MAX_SHARE = 1 / 16  # the most of a population the sample reads
MAX_SLABS = 64  # the most reads the sample makes of a tensor
Z = 6.0  # the bracket's half-width, in standard errors of the sample's estimate of the k-th rank
BRACKET_ENTRIES = 2**22  # the most values a bracket keeps (16 MB); a wider bracket is not tried
INFINITY_BITS = 0x7F800000  # +inf as a float32 bit pattern: a bracket with no top


def magnitudes(vector: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|x| as float32 (flat), in `out` or this thread's buffer: float64 values are compared as the
    float32 values nearest to them. Their bit patterns, read as int32, order as the magnitudes do."""
    if out is None:
        out = thread_buffer("magnitudes", vector.numel(), torch.float32)
    if vector.dtype == torch.float32:
        return torch.abs(vector.reshape(-1), out=out)
    return out.copy_(vector.reshape(-1)).abs_()


def _float(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def sample_size(size: int) -> int:
    """How many magnitudes to sample of a population of `size`: a bracket of ±Z standard errors holds
    about 2Z·√(q(1−q)/m)·size values (q the share kept, at most ½), half of BRACKET_ENTRIES at most."""
    return int(min(2**22, max(2**16, (Z * size / (BRACKET_ENTRIES / 2)) ** 2)))


def sample_share(size: int) -> float:
    """The share of a population's rows its sample reads."""
    return min(MAX_SHARE, sample_size(size) / size)


def sample_rows(blocks: list[tuple[int, int] | None], share: float) -> Iterator[tuple[int, int] | None]:
    """The rows the sample reads of a tensor's row blocks: `share` of the rows of every group of blocks
    (one row at least), as one slab at a place drawn from the group's first row (a fixed hash: the same
    rows on every run). At most MAX_SLABS groups: a read costs the same for a row as for a slab."""
    if blocks == [None]:
        yield None
        return
    group = math.ceil(len(blocks) / MAX_SLABS)
    for first in range(0, len(blocks), group):
        start, stop = blocks[first][0], blocks[min(len(blocks), first + group) - 1][1]
        take = max(1, math.ceil((stop - start) * share))
        at = start + (start * 2654435761 + 40503) % (stop - start - take + 1)
        yield at, at + take


@dataclass(frozen=True)
class SamplePlan:
    """How much a population's sample pass reads: `elements` in `slabs` reads."""

    elements: int
    slabs: int

    def __add__(self, other: SamplePlan) -> SamplePlan:
        return SamplePlan(self.elements + other.elements, self.slabs + other.slabs)


class Sample:
    """Every `stride`-th magnitude (as float32 bit patterns) of each slab the sample pass reads, in one
    store allocated up front (many small tensors kept while the workers' block buffers come and go
    would fragment the heap), and how many each slab gave."""

    def __init__(self, plan: SamplePlan, size: int):
        self.stride = max(1, plan.elements // sample_size(size)) | 1  # odd: a row's columns all take turns
        self.entries = -(-plan.elements // self.stride) + plan.slabs
        self.store: torch.Tensor | None = None  # allocated by the first slab: a plan holds every population
        self.used = 0
        self.slabs: list[int] = []
        self.lock = threading.Lock()

    def add(self, bits: torch.Tensor) -> None:
        kept = bits[::self.stride]
        with self.lock:
            if self.store is None:
                self.store = torch.empty(self.entries, dtype=torch.int32)
            at = self.used
            kept = kept[:self.entries - at]  # only if a pass read more than planned
            self.used += kept.numel()
            self.slabs.append(kept.numel())
        self.store[at:at + kept.numel()].copy_(kept)

    def bracket(self, size: int, k: int) -> Bracket | None:
        """A bracket around the k-th largest of the population of `size` the sample was drawn from; None
        when the sample cannot give a useful one (then the exact passes count it)."""
        if self.store is None or len(self.slabs) < 2 or self.used < 2:
            return None
        values = self.store[:self.used]
        m = values.numel()
        if m < 2:
            return None
        rate = m / size

        def largest(index: int) -> int:  # the sample's (index + 1)-th largest
            return int(torch.kthvalue(values, m - index).values)

        estimate = largest(min(m - 1, max(0, round(k * rate) - 1)))
        above = torch.cumsum((values > estimate).to(torch.float64), 0)
        ends = torch.tensor(self.slabs, dtype=torch.int64).cumsum(0) - 1
        per_slab = torch.diff(above[ends], prepend=torch.zeros(1, dtype=torch.float64))
        sizes = torch.tensor(self.slabs, dtype=torch.float64)
        share = float(per_slab.sum()) / m
        slabs = len(self.slabs)
        spread = float(((per_slab - share * sizes) ** 2).sum()) * slabs / (slabs - 1)
        sigma = math.sqrt(max(spread, share * (1 - share) * m, 1.0)) / rate  # in ranks of the population
        margin = Z * sigma + 1 / rate
        top = math.floor((k - margin) * rate) - 1
        bottom = math.ceil((k + margin) * rate) - 1
        hi = largest(top) if top >= 0 else INFINITY_BITS
        lo = max(1, largest(bottom)) if bottom < m else 1  # zeros are counted apart (Bracket)
        inside = int(((values >= lo) & (values <= hi)).sum())
        expected = inside / rate
        if expected * 1.25 > BRACKET_ENTRIES:
            return None
        return Bracket(lo, hi, min(BRACKET_ENTRIES, math.ceil(2 * expected) + 4096))


@dataclass
class Settled:
    """The k-th largest value's bits, how many values lie above it, how many equal it, and each
    block's count of values equal to it (by the block's first position)."""

    threshold: int
    above: int
    equal: int
    ties: dict[int, int]


class Bracket:
    """The pass over a bracket [lo, hi] of magnitudes (float32 bit patterns, lo ≥ 1): each block's
    count of values above hi, and its values in the bracket, kept in one store; the values below lo
    are the block's others (zeros, when lo is the least positive float)."""

    def __init__(self, lo: int, hi: int, entries: int):
        self.lo, self.hi = lo, hi
        self.below = _float(lo - 1)  # hardshrink keeps |x| > λ: λ just under lo keeps the bracket
        self.top = _float(hi)
        self.entries = entries
        self.store: torch.Tensor | None = None  # allocated by the first block: brackets wait for their pass together
        self.used = 0
        self.blocks: dict[int, tuple[int, int, int, int]] = {}  # start → (at, kept, above, size)
        self.failed = False
        self.lock = threading.Lock()

    def count(self, vector: torch.Tensor, start: int) -> None:
        """Fold one block of values (flat)."""
        found = magnitudes(vector)
        size = found.numel()
        over = torch.hardshrink(found, self.top, out=thread_buffer("bracket-above", size, torch.float32))
        within = torch.hardshrink(found, self.below, out=thread_buffer("bracket-within", size, torch.float32))
        # numpy's compress: a third of the time of torch's masked select on a CPU (0.3 against 1.2 ns a value)
        kept = torch.from_numpy(numpy.compress(within.sub_(over).numpy() != 0, found.view(torch.int32).numpy()))
        kept = kept[kept <= self.hi]  # an inf above the bracket leaves inf − inf there
        above = float(over.sign_().sum())  # NaN when a value is NaN: then the exact passes decide
        with self.lock:
            if self.store is None:
                self.store = torch.empty(self.entries, dtype=torch.int32)
            at = self.used
            self.used += kept.numel()
            if not math.isfinite(above) or self.used > self.entries:
                self.failed = True
                return
            self.blocks[start] = (at, kept.numel(), int(above), size)
        self.store[at:at + kept.numel()].copy_(kept)

    def settle(self, k: int) -> Settled | None:
        """The k-th largest of every value counted, or None when the bracket does not hold it."""
        above = sum(block[2] for block in self.blocks.values())
        rank = k - above  # the k-th largest is the rank-th largest kept (or a zero, past them all)
        if self.failed or rank < 1 or self.store is None:
            return None
        kept = self.store[:self.used]
        if rank > kept.numel():
            if self.lo != 1:
                return None
            # below the bracket lie only zeros: the k-th largest is 0
            ties = {start: size - count - over for start, (_, count, over, size) in self.blocks.items()}
            return Settled(0, above + kept.numel(), sum(ties.values()), ties)
        threshold = int(torch.kthvalue(kept, kept.numel() - rank + 1).values)
        over_in = int((kept > threshold).sum())
        ties = {start: int((self.store[at:at + count] == threshold).sum())
                for start, (at, count, _, _) in self.blocks.items()}
        return Settled(threshold, above + over_in, sum(ties.values()), ties)
