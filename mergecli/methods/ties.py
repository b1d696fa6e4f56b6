"""TIES merging (Yadav et al., NeurIPS 2023): trim each task vector to its `density` fraction of largest
magnitudes, elect a sign per entry from Σ w_i δ̂_i, keep the entries that agree with it, and take their
weighted mean (`normalize`, on by default); θ = θ_b + λ × that.

The trim is exact (⌊density × n⌋ entries, ties at the threshold broken by position) and streamed
(methods/magnitude.py): per tensor (the default, as mergekit), or, with `trim_scope = "model"`, over a
model's whole task vector (as the paper's code and FusionBench), each threshold from passes over row
blocks before the merge, never from a tensor held whole: a sample of rows and one full pass for a
large population (methods/bracket.py), histogram passes for a small one.
"""

from __future__ import annotations

import threading
from typing import Literal

import torch

from mergecli.errors import RecipeError
from mergecli.io.checkpoint import iter_row_blocks
from mergecli.methods.base import Prepass, TensorTask, register, settings_at, shown_value
from mergecli.methods.bracket import SamplePlan, sample_rows, sample_share
from mergecli.methods.magnitude import BRACKET, DONE, LOW, SAMPLE, TIES, TOP, TopMagnitudes
from mergecli.methods.task_vectors import (
    DensitySettings,
    ModelDensity,
    TaskVectorMethod,
    add_elected,
    deltas,
    shown_density,
)
from mergecli.recipe.varying import varies

PAPER = "https://arxiv.org/abs/2306.01708"
BRACKET_BLOCKS = 2  # row blocks read at once by the bracket pass (its work per value is light: fewer calls pay)


class TiesSettings(DensitySettings):
    """`[ties]`: density, lambda and where the trim's threshold is taken."""

    trim_scope: Literal["tensor", "model"] = "tensor"


class Population:
    """The values one threshold is taken over (a model's task vector in one tensor, or in all of them),
    and how many tasks must finish a pass before it is settled."""

    def __init__(self, size: int, density: float, members: int, sample: SamplePlan):
        self.trim = TopMagnitudes(size, density, sample=sample)
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


PASS_LABELS = {SAMPLE: "TIES thresholds: a sample of rows", BRACKET: "TIES thresholds: the values near each cut",
               TOP: "TIES thresholds: counting magnitudes", LOW: "TIES thresholds: counting within the cut's bucket",
               TIES: "TIES thresholds: equal values at the cut"}


class TrimPass(Prepass):
    """Pass `depth` (a stage of TopMagnitudes) of a task's trims: one read of the tensor's blocks (a
    sample of its rows, for the SAMPLE stage) counts every model's task vector into its population (at
    the tensor's offset in it)."""

    def __init__(self, depth: int, populations: list[tuple[Population, int]], share: float, block: int):
        self.depth = depth
        self.label = PASS_LABELS[depth]
        self.populations = populations
        self.share = share  # of the rows, that the sample reads
        self.block = block  # elements in a row block of the merge: the trims know each block by its start
        expected = {stage for population, _ in populations for stage in population.trim.expected_passes()}
        self.reads = (share if depth == SAMPLE else 1.0) if depth in expected else 0.0

    def needed(self) -> bool:
        return any(population.trim.stage == self.depth for population, _ in self.populations)

    def rows(self, blocks: list[tuple[int, int] | None]) -> list[tuple[int, int] | None]:
        if self.depth == SAMPLE:
            return list(sample_rows(blocks, self.share))
        if self.depth == BRACKET and blocks != [None]:  # fewer, larger reads: measured 8% faster there
            return [(blocks[i][0], blocks[min(len(blocks), i + BRACKET_BLOCKS) - 1][1])
                    for i in range(0, len(blocks), BRACKET_BLOCKS)]
        return blocks

    def fold(self, blocks: list[torch.Tensor], start: int) -> None:
        _, vectors = deltas(blocks)
        for (population, offset), vector in zip(self.populations, vectors):
            if population.trim.stage == self.depth:
                for at in range(0, vector.numel(), self.block):  # the merge's row blocks, in a larger read
                    population.trim.count(vector[at:at + self.block], offset + start + at)

    def task_done(self) -> None:
        for population, _ in self.populations:
            population.done(self.depth)


class Ties(TaskVectorMethod):
    name = "ties"
    title = "TIES merge"
    help = "task vectors trimmed to their largest magnitudes, a sign elected per entry, the agreeing ones averaged"
    mergekit = "ties"
    mergekit_defaults = {"density": 1.0}  # mergekit keeps every entry unless told a density
    settings = TiesSettings
    model_settings = ModelDensity
    normalize_default = True
    kinds = {"ties": "TIES"}

    def check(self, recipe) -> None:
        super().check(recipe)
        if recipe.settings.trim_scope == "model":
            varying = [spec.name for spec in recipe.models if spec.settings.density is not None
                       and varies(spec.settings.density)] + (["[ties]"] if varies(recipe.settings.density) else [])
            if varying:
                raise RecipeError(recipe.source, [recipe.locate(
                    f"ties.trim_scope: \"model\" takes one threshold over each model's whole task vector, so its "
                    f"density cannot vary by tensor ({varying[0]}'s does)")])

    def shared(self, recipe, floating):
        """With `trim_scope = "model"`: one population per model, every floating tensor's task vector in
        the reference's tensor order, and each tensor's offset in it."""
        if recipe.settings.trim_scope != "model":
            return None
        size = sum(task.out.numel for task in floating)
        share = sample_share(size)
        sample = sum((sample_plan(task, share) for task in floating), SamplePlan(0, 0))
        densities = [model.density for model in settings_at(recipe, "", 0.0).models]
        populations = [Population(size, density, len(floating), sample) for density in densities]
        offsets, position = {}, 0
        for task in floating:
            offsets[task.out.name] = position
            position += task.out.numel
        return populations, offsets, share

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        model_density = [model.density for model in here.models]
        if shared is not None:
            model_scope, offsets, share = shared
            populations = [(model_scope[index], offsets[task.out.name]) for index, _, _ in read]
        else:
            share = sample_share(task.out.numel)
            sample = sample_plan(task, share)
            populations = [(Population(task.out.numel, model_density[index], 1, sample), 0) for index, _, _ in read]
        weights = [weight for _, _, weight in read]
        normalize = self.normalize(recipe)
        scale = settings.lambda_ * (1.0 if normalize else 1.0 / self.divisor(recipe, here))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks)
            for (population, offset), vector, weight in zip(populations, vectors, weights):
                population.trim.trim_(vector, offset + start)
                if weight != 1:
                    vector.mul_(weight)
            return add_elected(base, vectors, weights, normalize=normalize, scale=scale).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        block = task.out.elements(row_blocks(task)[0])
        passes = tuple(TrimPass(depth, populations, share, block) for depth in range(DONE))
        # per worker: the task vectors and the election's buffers (float32 or float64), for blocks of up to
        # BRACKET_BLOCKS row blocks; and what the trims being counted hold
        itemsize = 8 if any(source.tensors[task.out.name].dtype == torch.float64 for source in sources) else 4
        buffers = (len(read) + 5) * itemsize * BRACKET_BLOCKS * task.block_elements
        trims = sum(population.trim.memory() for population, _ in populations)
        return TensorTask(task.out, "ties", sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=passes, positional=True, work_bytes=buffers + trims, t=task.t)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        shown = shown_density(recipe)
        scope = "each model's whole task vector" if settings.trim_scope == "model" else "each tensor"
        weights = "the weighted mean of the agreeing entries" if self.normalize(recipe) else \
            "the weighted sum of the agreeing entries"
        return [f"**TIES** ([Yadav et al., NeurIPS 2023]({PAPER})): each task vector δᵢ = θᵢ − θ_base is trimmed to "
                f"its largest magnitudes, a sign is elected per entry from Σ wᵢ δ̂ᵢ, and θ = θ_base + λ × {weights}.",
                "", f"- density (fraction kept): {shown}",
                f"- trim scope: {scope} (`trim_scope = \"{settings.trim_scope}\"`), exactly ⌊density × n⌋ entries, "
                "ties at the threshold broken by position",
                f"- λ (`lambda`): {shown_value(settings.lambda_)}",
                "- computed in float32 (float64 for float64 inputs), rounded once"]


register(Ties())
