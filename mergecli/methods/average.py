"""Weighted averaging: θ = Σ w_i θ_i, accumulated in float32 (float64 for float64 inputs).

The math, and the `average` method, which keeps the planner's default tasks as they are.
"""

from __future__ import annotations

import torch

from mergecli.methods.base import Method, register


def accumulation_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def weighted_sum(tensors: list[torch.Tensor], weights: list[float], *, divisor: float = 1.0,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i t_i / divisor in the accumulation dtype; inputs may have different floating dtypes.

    The raw weights are summed and the total divided once, at the end (normalizing the weights
    first would round each of them). `out`, when given, is a tensor of the accumulation dtype and
    shape to write the sum into.

    Example:
        >>> weighted_sum([torch.ones(2, dtype=torch.bfloat16), torch.zeros(2)], [0.25, 0.75])
        tensor([0.2500, 0.2500])
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    dtype = accumulation_dtype([t.dtype for t in tensors])
    if out is None:
        total = tensors[0].to(dtype, copy=True)
    else:
        total = out
        total.copy_(tensors[0])
    total.mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)  # mixed dtypes computed in `dtype`, no temporary
    if divisor != 1.0:
        total.div_(divisor)
    return total


class Average(Method):
    """Weight ensembling: every floating tensor is the weighted average of the models' tensors."""

    name = "average"
    title = "weighted average"
    command = "average"

    def describe(self, recipe) -> list[str]:
        weights = "with the weights normalized to sum 1." if recipe.normalize else "with the weights as given."
        return [f"**Weighted average** of the parameters (weight ensembling): θ = Σ wᵢ θᵢ, {weights}", "",
                "- accumulated in float32 (float64 for float64 inputs)"]


register(Average())
