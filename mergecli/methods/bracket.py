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

The pass over the bracket compares each magnitude with its two ends, counts what lies above it, and
keeps what lies in it (as bit patterns, block by block): numpy's comparisons and `compress`, several
times faster on a CPU than torch's bool masks and masked select, and they release the GIL. A bracket
that misses the k-th value (its count says so), a store that would overflow, or values that are not
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


def _largest(values: numpy.ndarray, indices: list[int]) -> list[int]:
    """The (index + 1)-th largest of `values`, for each index (one partial sort for them all)."""
    if not indices:
        return []
    places = [values.size - 1 - index for index in indices]
    ordered = numpy.partition(values, places)
    return [int(ordered[place]) for place in places]


def _float(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def sample_size(size: int) -> int:
    """How many magnitudes to sample of a population of `size`: a bracket of ±Z standard errors holds
    about 2Z·√(q(1−q)/m)·size values (q the share kept, at most ½), half of BRACKET_ENTRIES at most."""
    return int(min(2**22, max(2**16, (Z * size / (BRACKET_ENTRIES / 2)) ** 2)))


def bracket_entries(size: int) -> int:
    """The most values a population's bracket keeps (what `Sample.bracket` allows)."""
    m = sample_size(size)
    return min(BRACKET_ENTRIES, math.ceil(2 * 1.25 * 2 * Z * 0.5 * size / math.sqrt(m)) + 4096)


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
    store of the planned size, allocated once by the first slab (many small tensors kept while the
    workers' block buffers come and go would fragment the heap), and how many each slab gave."""

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
        values = self.store[:self.used].numpy()
        m = values.size
        rate = m / size
        estimate = _largest(values, [min(m - 1, max(0, round(k * rate) - 1))])[0]
        counts = numpy.concatenate([[0], numpy.cumsum(values > estimate)])
        sizes = numpy.array(self.slabs, dtype=numpy.float64)
        per_slab = numpy.diff(counts[numpy.concatenate([[0], numpy.cumsum(self.slabs)])]).astype(numpy.float64)
        share = float(per_slab.sum()) / m
        slabs = len(self.slabs)
        spread = float(((per_slab - share * sizes) ** 2).sum()) * slabs / (slabs - 1)
        sigma = math.sqrt(max(spread, share * (1 - share) * m, 1.0)) / rate  # in ranks of the population
        margin = Z * sigma + 1 / rate
        top = math.floor((k - margin) * rate) - 1
        bottom = math.ceil((k + margin) * rate) - 1
        ends = _largest(values, [index for index in (top, bottom) if 0 <= index < m])
        hi = ends.pop(0) if top >= 0 else INFINITY_BITS
        lo = max(1, ends.pop(0)) if bottom < m else 1  # zeros are counted apart (Bracket)
        inside = numpy.count_nonzero((values >= lo) & (values <= hi))
        expected = inside / rate
        if expected * 1.25 > BRACKET_ENTRIES:
            return None
        return Bracket(lo, hi, min(BRACKET_ENTRIES, math.ceil(2 * expected) + 4096))


@dataclass
class Settled:
    """The k-th largest value's bits, how many values lie above it, how many equal it, and, when not all
    of those are kept, each block's count of them (by the block's first position)."""

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
        self.low, self.top = _float(lo), _float(hi)
        self.entries = entries
        self.store: torch.Tensor | None = None  # allocated by the first block: brackets wait for their pass together
        self.used = 0
        self.blocks: dict[int, tuple[int, int, int, int]] = {}  # start → (at, kept, above, size)
        self.failed = False
        self.lock = threading.Lock()

    def count(self, vector: torch.Tensor, start: int) -> None:
        """Fold one block of values (flat)."""
        found = magnitudes(vector).numpy()
        size = found.size
        at_least = numpy.greater_equal(found, self.low, out=thread_buffer("bracket-low", size, torch.bool).numpy())
        over = numpy.greater(found, self.top, out=thread_buffer("bracket-top", size, torch.bool).numpy())
        above, counted = numpy.count_nonzero(over), numpy.count_nonzero(at_least)
        inside = numpy.logical_xor(at_least, over, out=at_least)
        kept = torch.from_numpy(numpy.compress(inside, found.view(numpy.int32)))
        counted += numpy.count_nonzero(numpy.less(found, self.low, out=over))  # == size unless a NaN
        above = above if counted == size else math.nan  # a NaN: then the exact passes decide
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
        kept = self.store[:self.used].numpy()
        if rank > kept.size:
            if self.lo != 1:
                return None
            # below the bracket lie only zeros: the k-th largest is 0
            ties = {start: size - count - over for start, (_, count, over, size) in self.blocks.items()}
            return Settled(0, above + kept.size, sum(ties.values()), ties)
        threshold = _largest(kept, [rank - 1])[0]
        above += numpy.count_nonzero(kept > threshold)
        equal = numpy.count_nonzero(kept == threshold)
        ties = {}  # each block's count of them, needed only when some are dropped
        if k - above < equal:
            ties = {start: numpy.count_nonzero(kept[at:at + count] == threshold)
                    for start, (at, count, _, _) in self.blocks.items()}
        return Settled(threshold, above, equal, ties)
