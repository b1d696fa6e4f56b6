"""What the task-vector methods share: task vectors δ_i = θ_i − θ_b of the models against the base,
the sign election of TIES, and a `Method` whose tasks turn every averaged tensor into its own.

Every block is computed in float32 for 16-bit inputs and output (float64 otherwise) and rounded once,
into the output dtype: θ = θ_b + λ · merge(w_1 δ_1, ..., w_n δ_n).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from pydantic import Field

from mergecli.errors import RecipeError
from mergecli.exact import add_scaled_, common_fraction
from mergecli.io.buffers import thread_buffer
from mergecli.methods.average import accumulation_dtype
from mergecli.methods.base import Inputs, Method, TensorSettings, TensorTask, settings_at
from mergecli.recipe import Recipe, StrictModel, scaled_weights
from mergecli.recipe.varying import Varying


class LambdaSettings(StrictModel):
    """`lambda`: how much of the merged task vector is added to the base (a scale)."""

    model_config = {**StrictModel.model_config, "populate_by_name": True}
    lambda_: Varying(float, allow_inf_nan=False) = Field(default=1.0, alias="lambda")


def _fraction(density: float) -> float:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density:g}")
    return density


DensityValue = Varying(float, allow_inf_nan=False, check=_fraction)  # the share of a task vector's entries kept


class DensitySettings(LambdaSettings):
    """`density`: for every model, or a table of model name → density (a model's own `density = ...` in
    its [[models]] entry wins); each a number, or varying by tensor."""

    density: DensityValue | dict[str, DensityValue] = 0.2


class ModelDensity(StrictModel):
    """A [[models]] entry's own density."""

    density: DensityValue | None = None


def check_densities(recipe: Recipe) -> None:
    """Every model has a density (its own, or the table's), and a table by model name names models.

    Raises:
        RecipeError: a table entry names no model, or a model has no density in the table.
    """
    table = recipe.settings.density
    if not isinstance(table, dict):
        return
    names = [m.name for m in recipe.models]
    unknown = [name for name in table if name not in names]
    if unknown:
        raise RecipeError(recipe.source, [recipe.locate(f"{recipe.method}.density: {unknown[0]!r} is not a model of "
                                                        f"the recipe (models: {', '.join(names)})")])
    for index, spec in enumerate(recipe.models):
        if spec.name not in table and (spec.settings is None or spec.settings.density is None):
            raise RecipeError(recipe.source, [recipe.locate(f"models.{index} ({spec.name}): no density (set it in "
                                                            f"its [[models]] entry, or in [{recipe.method}] "
                                                            "density)")])


def shown_density(recipe: Recipe) -> str:
    """The densities as the card says them: `math 0.7, code 0.3` (a varying one as written)."""
    table = recipe.settings.density
    parts = []
    for spec in recipe.models:
        own = spec.settings.density if spec.settings is not None else None
        value = own if own is not None else table.get(spec.name) if isinstance(table, dict) else table
        parts.append(f"{spec.name} {value:g}" if isinstance(value, (int, float)) else f"{spec.name} {value}")
    return ", ".join(parts)


def deltas(blocks: list[torch.Tensor], out: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(θ_b, [δ_1, ..., δ_n]) of one row block, flat, in the accumulation dtype for an output of dtype `out`
    (methods/average.py accumulation_dtype), in this thread's buffers (valid until its
    next call): `blocks` is the base's block, then each model's. Each δ is taken in that dtype from the
    inputs as they are (exact for bf16; in float64, rounded to float32 it is the float32 difference)."""
    dtype = accumulation_dtype([b.dtype for b in blocks], out)
    size = blocks[0].numel()
    base = thread_buffer("base", size, dtype).copy_(blocks[0].reshape(-1))
    return base, [thread_buffer(("delta", index), size, dtype).copy_(block.reshape(-1)).sub_(base)
                  for index, block in enumerate(blocks[1:])]


def add_elected(base: torch.Tensor, weighted: list[torch.Tensor], weights: list[float], *, normalize: bool,
                scale: float) -> torch.Tensor:
    """θ_b + scale × TIES' disjoint merge of trimmed, weighted task vectors w_i δ̂_i (flat), into `base`:
    the sign of their sum is elected per entry (≥ 0 counts as +); the entries whose own sign agrees are
    summed, and divided by the sum of their weights when `normalize` (an entry no model agrees on is 0).
    A zero never agrees.

    Float arithmetic throughout (no boolean masks: on a CPU they cost several times a float pass):
    s = ±1 the elected sign, max(s·x, 0) is |x| where x agrees and 0 elsewhere, and its sign is 1 or 0;
    each buffer is written by the first model's step, not zeroed and then added to.
    """
    size, dtype = weighted[0].numel(), weighted[0].dtype
    total = thread_buffer("total", size, dtype)
    torch.add(weighted[0], weighted[1], out=total) if len(weighted) > 1 else total.copy_(weighted[0])
    for vector in weighted[2:]:
        total.add_(vector)
    sign = torch.copysign(torch.ones((), dtype=dtype), total, out=thread_buffer("sign", size, dtype))
    agreeing = torch.mul(weighted[0], sign, out=total).clamp_(min=0)
    divisor = torch.sign(agreeing, out=thread_buffer("divisor", size, dtype)).mul_(weights[0]) if normalize else None
    part = thread_buffer("part", size, dtype)
    for vector, weight in zip(weighted[1:], weights[1:]):
        agreeing.add_(torch.mul(vector, sign, out=part).clamp_(min=0))
        if divisor is not None:
            divisor.add_(part.sign_(), alpha=weight)
    agreeing.mul_(sign)
    if divisor is None:
        return add_scaled_(base, agreeing, scale)
    if min(weights) > 0:  # the divisor is 0 only where nothing agrees, and the sum is 0 there
        divisor.clamp_(min=torch.finfo(dtype).tiny)
    else:
        divisor.masked_fill_(divisor == 0, 1.0)
    exact = common_fraction([scale])
    if exact is None:
        return base.addcdiv_(agreeing, divisor, value=scale)
    (numerator,), denominator = exact  # (divisor · d · θ_b + n · Σ) / (divisor · d): one rounding
    if denominator != 1.0:
        divisor.mul_(denominator)
    return base.mul_(divisor).add_(agreeing, alpha=numerator).div_(divisor)


class TaskVectorMethod(Method):
    """A method that merges task vectors against `[base]`: every tensor the average would make is the
    base plus λ times the merged task vectors; heads, excluded and integer tensors come from the base.

    A subclass says how one tensor's task is made (`task_for`), from the models that are read (those
    whose weight for the tensor is 0 are not), their weights, and the recipe's settings for the tensor.
    """

    command = "merge"
    needs_base: ClassVar[bool] = True
    linear: ClassVar[bool] = False  # a weighted sum of the inputs: a row only the models have comes out their mean
    uses_weights: ClassVar[bool] = True  # False: every model counts alike (the method weighs them itself)
    kinds: ClassVar[dict[str, str]] = {}

    def check(self, recipe: Recipe) -> None:
        if self.needs_base and recipe.base is None:
            raise RecipeError(recipe.source, [f"method: {self.name} merges task vectors (each model minus the "
                                              "base): it needs a [base] model"])
        if self.settings is not None and "density" in self.settings.model_fields:
            check_densities(recipe)

    def tasks(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[TensorTask]:
        if not self.uses_weights and any(spec.weight != 1.0 for spec in recipe.models):
            warnings.append(f"{self.name}: the models' weights are not used (every model counts alike)")
        shared = self.shared(recipe, [task for task in tasks if task.kind == "average"])
        out = []
        for task in tasks:
            if task.kind != "average":
                out.append(task)
                continue
            here = settings_at(recipe, task.out.name, task.t)
            weights = scaled_weights(here.weights)[0] if self.uses_weights else [1.0] * len(inputs.models)
            read = [(index, checkpoint, weight) for index, (checkpoint, weight)
                    in enumerate(zip(inputs.models, weights)) if weight != 0]
            made = self.task_for(recipe, inputs, task, read, shared, here)
            lacking = inputs.new_rows.get(task.out.name)
            if lacking is not None and not self.linear:
                made = with_new_rows(made, lacking, [weight for _, _, weight in read])
            out.append(made)
        return out

    def shared(self, recipe: Recipe, floating: list[TensorTask]) -> Any:
        """What the tasks of one merge share (statistics over every tensor), given to each `task_for`."""
        return None

    def task_for(self, recipe: Recipe, inputs: Inputs, task: TensorTask, read: list[tuple[int, Any, float]],
                 shared: Any, here: TensorSettings) -> TensorTask:
        """The task of one floating tensor, from the models read: (index in the recipe, checkpoint,
        weight scaled by a power of two), with `here`, the recipe's settings for this tensor."""
        raise NotImplementedError

    def divisor(self, recipe: Recipe, here: TensorSettings) -> float:
        """What the weighted sum of task vectors is divided by: the sum of the (tensor's) weights with
        `normalize`, else the power of two that the weights were scaled by (so that they count as given)."""
        scaled, scale = scaled_weights(here.weights)
        return math.fsum(scaled) if self.normalize(recipe) else scale


def with_new_rows(task: TensorTask, lacking: torch.Tensor, weights: list[float]) -> TensorTask:
    """`task` (its sources the base, then the models read, with `weights`), but for the rows the base
    lacks (`lacking`, a bool per row: tokens only the models have), which are the weighted mean of the
    models' rows: a task vector against a row the base does not have means nothing, so trimming, dropping
    or electing signs on it would make each entry one model's value, or push it outward."""
    row_elements = task.out.numel // task.out.shape[0]
    total = math.fsum(weights)

    def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
        merged = task.combine(blocks, out, start) if task.positional else task.combine(blocks, out)
        first = start // row_elements
        rows = lacking[first:first + blocks[0].shape[0]]
        if bool(rows.any()):
            mean = sum(weight * block[rows].to(merged.dtype if merged.is_floating_point() else torch.float32)
                       for block, weight in zip(blocks[1:], weights))
            merged.view(blocks[0].shape)[rows] = (mean / total).to(merged.dtype)
        return merged

    return dataclasses.replace(task, combine=combine, positional=True)
