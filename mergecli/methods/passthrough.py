"""Passthrough: every tensor taken as it is from its only source (times its `scale`, where a source sets
one), as mergekit defines it. With `[[slices]]`, one source per slice: frankenmerges, depth up-scaling,
a model's layers repeated.
"""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.io.buffers import thread_buffer
from mergecli.methods.average import accumulation_dtype
from mergecli.methods.base import Method, TensorTask, copy_first, register, settings_at
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying


class PassthroughModel(StrictModel):
    """A source's `scale`: its tensors multiplied by it (unset: taken as they are)."""

    scale: Varying(float, allow_inf_nan=False) | None = None


def scaled_copy(scale: float):
    """The combine of a tensor taken from its only source, times `scale`, rounded once."""

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        dtype = accumulation_dtype([blocks[0].dtype], out.dtype)
        return thread_buffer("scaled", blocks[0].numel(), dtype).view(blocks[0].shape).copy_(blocks[0]).mul_(scale)

    return combine


class Passthrough(Method):
    name = "passthrough"
    title = "passthrough merge"
    help = "each tensor taken as it is from its only source: with [[slices]], frankenmerges and depth up-scaling"
    mergekit = "passthrough"
    model_settings = PassthroughModel
    kinds = {"passthrough": "taken as they are"}
    copies_one_model = True

    def check(self, recipe) -> None:
        if len(recipe.models) != 1:
            raise RecipeError(recipe.source, [recipe.locate(f"models: passthrough takes each tensor from one model "
                                                            f"(a slice's one source); the recipe has "
                                                            f"{len(recipe.models)}")])
        if recipe.base is not None:
            raise RecipeError(recipe.source, [recipe.locate("base: passthrough reads no [base]")])

    def tasks(self, recipe, inputs, tasks, warnings):
        source = inputs.models[0]
        out = []
        for task in tasks:
            if task.kind != "average":
                out.append(task)
                continue
            scale = settings_at(recipe, task.out.name, task.t).models[0].scale
            combine = copy_first if scale is None or scale == 1 else scaled_copy(scale)
            out.append(TensorTask(task.out, "passthrough", (source,), combine, task.block_elements,
                                  independent_blocks=True, t=task.t))
        return out

    def describe(self, recipe) -> list[str]:
        return ["**Passthrough**: every tensor is taken as it is from its only source (times the source's "
                "`scale`, where one is set): with slices, the output's layers are the slices' layers, in order.", ""]


register(Passthrough())
