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

from typing import Literal

import torch

from mergecli.errors import RecipeError
from mergecli.methods.base import TensorTask, register, settings_at, shown_value
from mergecli.methods.bracket import SamplePlan, sample_share
from mergecli.methods.task_vectors import (
    DensitySettings,
    ModelDensity,
    TaskVectorMethod,
    add_elected,
    deltas,
    shown_density,
)
from mergecli.methods.trims import BRACKET_BLOCKS, Population, row_blocks, sample_plan, trim_passes
from mergecli.recipe.varying import varies

PAPER = "https://arxiv.org/abs/2306.01708"


class TiesSettings(DensitySettings):
    """`[ties]`: density, lambda and where the trim's threshold is taken."""

    trim_scope: Literal["tensor", "model"] = "tensor"


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
            populations = [(model_scope[index], offsets[task.out.name], i) for i, (index, _, _) in enumerate(read)]
        else:
            share = sample_share(task.out.numel)
            sample = sample_plan(task, share)
            populations = [(Population(task.out.numel, model_density[index], 1, sample), 0, i)
                           for i, (index, _, _) in enumerate(read)]
        weights = [weight for _, _, weight in read]
        normalize = self.normalize(recipe)
        scale = settings.lambda_ * (1.0 if normalize else 1.0 / self.divisor(recipe, here))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            for (population, offset, _), vector, weight in zip(populations, vectors, weights):
                population.trim.trim_(vector, offset + start)
                if weight != 1:
                    vector.mul_(weight)
            return add_elected(base, vectors, weights, normalize=normalize, scale=scale).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        block = task.out.elements(row_blocks(task)[0])
        passes = trim_passes(populations, share, block)
        # per worker: the task vectors and the election's buffers (float32 or float64), for blocks of up to
        # BRACKET_BLOCKS row blocks; and what the trims being counted hold
        itemsize = 8 if any(source.tensors[task.out.name].dtype == torch.float64 for source in sources) else 4
        buffers = (len(read) + 5) * itemsize * BRACKET_BLOCKS * task.block_elements
        trims = sum(population.trim.memory() for population, _, _ in populations)
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
                "- computed in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]


register(Ties())
