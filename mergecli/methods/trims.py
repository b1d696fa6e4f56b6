"""Exact top-k cuts of streamed values, as prepasses: which entries of a tensor (or of a model's whole task
vector) are among the k largest magnitudes of some values computed from its row blocks. TIES trims task
vectors with them, breadcrumbs cuts a band between two of them, SCE takes the entries of largest variance
across models, arcee_fusion the quantiles of its importance scores.

A `Population` is the values one cut is taken over; a `TrimPass` is one streamed pass (a stage of
methods/magnitude.py's TopMagnitudes) that counts every population of a task, each fed one of the
vectors that `values` computes from a block. The values are never held: each pass computes them again
from the block it reads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from mergecli.io.checkpoint import iter_row_blocks
from mergecli.methods.base import Prepass, TensorTask
from mergecli.methods.bracket import SamplePlan, sample_rows
from mergecli.methods.magnitude import BRACKET, DONE, LOW, SAMPLE, TIES, TOP, TopMagnitudes
from mergecli.methods.task_vectors import deltas

BRACKET_BLOCKS = 2  # row blocks read at once by the bracket pass (its work per value is light: fewer calls pay)
STAGE_LABELS = {SAMPLE: "a sample of rows", BRACKET: "the values near each cut", TOP: "counting magnitudes",
                LOW: "counting within the cut's bucket", TIES: "equal values at the cut"}

# (a block's input blocks, every source's, in the task's order; its first element's flat position) → the
# vectors (flat) whose magnitudes are counted
Values = Callable[[list[torch.Tensor], int], list[torch.Tensor]]


def task_vectors(blocks: list[torch.Tensor], start: int) -> list[torch.Tensor]:
    """The task vectors δ_i = θ_i − θ_b of a block (the base first among the sources)."""
    return deltas(blocks)[1]


class Population:
    """The values one cut is taken over (a model's task vector in one tensor, or in all of them), and
    how many tasks must finish a pass before it is settled. `k`: how many are kept (else ⌊density × size⌋)."""

    def __init__(self, size: int, density: float, members: int, sample: SamplePlan | None, k: int | None = None):
        self.trim = TopMagnitudes(size, density, sample=sample, k=k)
        self.members = members
        self.left = members
        self.lock = threading.Lock()

    def done(self, depth: int) -> None:
        if self.trim.stage != depth:
            return
        with self.lock:
            self.left -= 1
            settled = self.left == 0
            if settled:
                self.left = self.members
        if settled:
            self.trim.finish_pass()


def row_blocks(task: TensorTask) -> list[tuple[int, int] | None]:
    """A task's row blocks (None: the whole tensor)."""
    return list(iter_row_blocks(task.sources[0].tensors[task.out.name], task.block_elements))


def sample_plan(task: TensorTask, share: float) -> SamplePlan:
    """What the sample pass reads of a task's tensor, `share` of its rows."""
    slabs = [task.out.elements(rows) for rows in sample_rows(row_blocks(task), share)]
    return SamplePlan(sum(slabs), len(slabs))


class TrimPass(Prepass):
    """Pass `depth` (a stage of TopMagnitudes) of a task's cuts: one read of the tensor's blocks (a sample
    of its rows, for the SAMPLE stage) counts each population (population, its offset for this tensor,
    which of the block's `values` it counts). The list of populations may be filled in by an earlier
    prepass (a cut whose k is counted first)."""

    def __init__(self, depth: int, populations: list[tuple[Population, int, int]], share: float, block: int, *,
                 values: Values = task_vectors, label: str = "TIES thresholds"):
        self.depth = depth
        self.label = f"{label}: {STAGE_LABELS[depth]}"
        self.populations = populations
        self.share = share  # of the rows, that the sample reads
        self.block = block  # elements in a row block of the merge: the cuts know each block by its start
        self.values = values

    @property
    def reads(self) -> float:  # the populations may be filled in by an earlier pass
        expected = {stage for population, _, _ in self.populations for stage in population.trim.expected_passes()}
        return (self.share if self.depth == SAMPLE else 1.0) if self.depth in expected else 0.0

    def needed(self) -> bool:
        return any(population.trim.stage == self.depth for population, _, _ in self.populations)

    def rows(self, blocks: list[tuple[int, int] | None]) -> list[tuple[int, int] | None]:
        if self.depth == SAMPLE:
            return list(sample_rows(blocks, self.share))
        if self.depth == BRACKET and blocks != [None]:  # fewer, larger reads: measured 8% faster there
            return [(blocks[i][0], blocks[min(len(blocks), i + BRACKET_BLOCKS) - 1][1])
                    for i in range(0, len(blocks), BRACKET_BLOCKS)]
        return blocks

    def fold(self, blocks: list[torch.Tensor], start: int) -> None:
        vectors = self.values(blocks, start)
        for population, offset, index in self.populations:
            if population.trim.stage == self.depth:
                vector = vectors[index]
                for at in range(0, vector.numel(), self.block):  # the merge's row blocks, in a larger read
                    population.trim.count(vector[at:at + self.block], offset + start + at)

    def task_done(self) -> None:
        for population, _, _ in self.populations:
            population.done(self.depth)


def trim_passes(populations: list[tuple[Population, int, int]], share: float, block: int, *,
                values: Values = task_vectors, label: str = "TIES thresholds") -> tuple[TrimPass, ...]:
    """Every stage's pass of a task's cuts, in order (those with nothing to do are skipped as they come)."""
    return tuple(TrimPass(depth, populations, share, block, values=values, label=label) for depth in range(DONE))
