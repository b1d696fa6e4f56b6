"""NearSwap (alchemonaut), as mergekit 0.1.5 defines it: the base a and one model b, element by element,

    w = clamp(t / max(|a − b|, 1e-6), 0, 1)        θ = w · b + (1 − w) · a  =  a + w · (b − a)

so an entry where the two are within t of each other takes the model's value, and one where they are far
apart keeps (mostly) the base's.
"""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying

REFERENCE = "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"
CLOSEST = 1e-6  # mergekit's floor on |a − b|


class NearSwapSettings(StrictModel):
    """`[nearswap]`: `t`, the distance below which the model's value is taken whole (required)."""

    t: Varying(float, ge=0.0, allow_inf_nan=False)


class NearSwap(TaskVectorMethod):
    name = "nearswap"
    title = "NearSwap merge"
    help = "the base, with the entries where one model is within t of it swapped toward that model"
    mergekit = "nearswap"
    settings = NearSwapSettings
    uses_weights = False
    kinds = {"nearswap": "NearSwap"}

    def check(self, recipe) -> None:
        super().check(recipe)
        if len(recipe.models) != 1:
            raise RecipeError(recipe.source, [f"models: nearswap swaps the base toward one model, the recipe has "
                                              f"{len(recipe.models)}"])

    def task_for(self, recipe, inputs, task, read, shared, here):
        t = here.settings.t

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, (delta,) = deltas(blocks, out.dtype)
            distance = torch.abs(delta).clamp_(min=CLOSEST)
            weight = torch.div(torch.tensor(t, dtype=delta.dtype), distance, out=distance).clamp_(0, 1)
            return base.addcmul_(weight, delta).view(out.shape)

        sources = (inputs.base, read[0][1])
        return TensorTask(task.out, "nearswap", sources, combine, task.block_elements, independent_blocks=True,
                          t=task.t)

    def describe(self, recipe) -> list[str]:
        return [f"**NearSwap** ([alchemonaut]({REFERENCE})): θ = θ_base + w · (θ₁ − θ_base) per entry, with "
                "w = clamp(t / |θ₁ − θ_base|, 0, 1).", "", f"- t: {shown_value(recipe.settings.t)}",
                "- computed in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]


register(NearSwap())
