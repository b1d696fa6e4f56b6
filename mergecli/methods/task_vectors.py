"""What the task-vector methods share: task vectors δ_i = θ_i − θ_b of the models against the base,
the sign election of TIES, and a `Method` whose tasks turn every averaged tensor into its own.

Every block is computed in float32 (float64 for float64 inputs) and rounded once, into the output
dtype: θ = θ_b + λ · merge(w_1 δ_1, ..., w_n δ_n).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator

from mergecli.errors import RecipeError
from mergecli.methods.average import accumulation_dtype
from mergecli.methods.base import Inputs, Method, TensorTask
from mergecli.recipe import Recipe, StrictModel, scaled_weights

Density = float  # the fraction of a task vector's entries kept, in (0, 1]


class LambdaSettings(StrictModel):
    """`lambda`: how much of the merged task vector is added to the base (a scale)."""

    model_config = {**StrictModel.model_config, "populate_by_name": True}
    lambda_: float = Field(default=1.0, alias="lambda", allow_inf_nan=False)


class DensitySettings(LambdaSettings):
    """`density`: a number for every model, or a table of model name → density (a model's own
    `density = ...` in its [[models]] entry wins)."""

    density: float | dict[str, float] = 0.2

    @field_validator("density")
    @classmethod
    def _fraction(cls, value: float | dict[str, float]) -> float | dict[str, float]:
        for density in (value.values() if isinstance(value, dict) else [value]):
            if not 0 < density <= 1 or math.isnan(density):
                raise ValueError(f"density must be in (0, 1], got {density}")
        return value


class ModelDensity(StrictModel):
    """A [[models]] entry's own density."""

    density: float | None = Field(default=None, gt=0, le=1)


def densities(recipe: Recipe) -> list[float]:
    """Each model's density: its own entry's, else the table's (a number, or its entry by name).

    Raises:
        RecipeError: a table entry names no model, or a model has no density in the table.
    """
    table = recipe.settings.density
    if isinstance(table, dict):
        names = [m.name for m in recipe.models]
        unknown = [name for name in table if name not in names]
        if unknown:
            raise RecipeError(recipe.source, [f"{recipe.method}.density: {unknown[0]!r} is not a model of the recipe "
                                              f"(models: {', '.join(names)})"])
    found = []
    for index, spec in enumerate(recipe.models):
        own = spec.settings.density if spec.settings is not None else None
        value = own if own is not None else table.get(spec.name) if isinstance(table, dict) else table
        if value is None:
            raise RecipeError(recipe.source, [f"models.{index} ({spec.name}): no density (set it in its [[models]] "
                                              f"entry, or in [{recipe.method}] density)"])
        found.append(value)
    return found


def deltas(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(θ_b, [δ_1, ..., δ_n]) of one row block, in the accumulation dtype (float32, or float64 for
    float64 inputs): `blocks` is the base's block, then each model's."""
    dtype = accumulation_dtype([b.dtype for b in blocks])
    base = blocks[0].to(dtype)
    return base, [block.to(dtype) - base for block in blocks[1:]]


def elect_and_merge(weighted: list[torch.Tensor], weights: list[float], *, normalize: bool) -> torch.Tensor:
    """TIES' disjoint merge of trimmed, weighted task vectors w_i δ̂_i: the sign of their sum is elected
    per entry (≥ 0 counts as +); the entries whose own sign agrees are summed, and divided by the sum
    of their weights when `normalize` (an entry no model agrees on is 0). A zero never agrees."""
    total = torch.stack(weighted).sum(0) if len(weighted) > 1 else weighted[0].clone()
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total) if normalize else None
    for vector, weight in zip(weighted, weights):
        agree = torch.sign(vector) == elected
        merged += torch.where(agree, vector, 0)
        if divisor is not None:
            divisor += agree.to(divisor.dtype) * weight
    if divisor is not None:
        merged /= torch.where(divisor == 0, 1.0, divisor).to(merged.dtype)
    return merged


class TaskVectorMethod(Method):
    """A method that merges task vectors against `[base]`: every tensor the average would make is the
    base plus λ times the merged task vectors; heads, excluded and integer tensors come from the base.

    A subclass says how one tensor's task is made (`task_for`), from the models that are read (those
    of weight 0 are not) and their weights.
    """

    command = "merge"
    needs_base: ClassVar[bool] = True
    kinds: ClassVar[dict[str, str]] = {}

    def check(self, recipe: Recipe) -> None:
        if self.needs_base and recipe.base is None:
            raise RecipeError(recipe.source, [f"method: {self.name} merges task vectors (each model minus the "
                                              "base): it needs a [base] model"])

    def tasks(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[TensorTask]:
        weights = scaled_weights(recipe.models)[0]
        read = [(index, checkpoint, weight) for index, (checkpoint, weight) in enumerate(zip(inputs.models, weights))
                if weight != 0]
        shared = self.shared(recipe, [task for task in tasks if task.kind == "average"])
        return [self.task_for(recipe, inputs, task, read, shared) if task.kind == "average" else task
                for task in tasks]

    def shared(self, recipe: Recipe, floating: list[TensorTask]) -> Any:
        """What the tasks of one merge share (statistics over every tensor), given to each `task_for`."""
        return None

    def task_for(self, recipe: Recipe, inputs: Inputs, task: TensorTask, read: list[tuple[int, Any, float]],
                 shared: Any) -> TensorTask:
        """The task of one floating tensor, from the models read: (index in the recipe, checkpoint,
        weight scaled by a power of two)."""
        raise NotImplementedError

    def divisor(self, recipe: Recipe) -> float:
        """What the weighted sum of task vectors is divided by: the sum of the weights with `normalize`,
        else the power of two that the weights were scaled by (so that they count as given)."""
        return recipe.average_weights(normalize=self.normalize(recipe))[1]
