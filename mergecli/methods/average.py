"""Weighted averaging: θ = Σ w_i θ_i, accumulated in float32 for 16-bit inputs and output, float64 otherwise.

The math, and the `average` method, which keeps the planner's default tasks as they are.
"""

from __future__ import annotations

import torch

from mergecli.exact import common_fraction
from mergecli.io.buffers import thread_buffer
from mergecli.io.precision import for_requantization
from mergecli.methods.base import Combine, Method, register

WIDE = (torch.float32, torch.float64)
PRECISION = "in float32 for 16-bit inputs and output, float64 otherwise"  # what the cards say


def accumulation_dtype(dtypes: list[torch.dtype], out: torch.dtype | None = None) -> torch.dtype:
    """What a merge computes in: float32 for 16-bit inputs and output (exact for the bf16 and fp16 values
    and small integer weights it sums, mergecli/exact.py; else a few units of float32, which the output's
    rounding hides); float64 where an input or the output is float32 or float64 (float32 arithmetic on
    float32 values is not within one unit where terms cancel, nor correctly rounded to fp16 often enough);
    float32 for a block requantized to fp8 as it is written (io/precision.py)."""
    if for_requantization():
        return torch.float32
    return torch.float64 if out in WIDE or any(dtype in WIDE for dtype in dtypes) else torch.float32


CHUNK_ELEMENTS = 1 << 18  # elements summed per pass: the accumulator chunk stays in the L2 cache


def weighted_sum(tensors: list[torch.Tensor], weights: list[float], *, divisor: float = 1.0,
                 out: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_i t_i / divisor, accumulated in float32 (float64 when an input is float64) and rounded
    once into `out`'s dtype; inputs may have different floating dtypes.

    The raw weights are summed and the total divided once, at the end (normalizing the weights
    first would round each of them); a weight of exactly 1 costs no multiplication. When `out` is
    of another dtype than the accumulator (bf16 output, float32 sum), the sum runs chunk by chunk
    in `scratch` (a 1-D accumulator-dtype buffer, CHUNK_ELEMENTS or more; allocated when None), so
    that every pass but the reads of the inputs and the write of `out` stays in the cache: one read
    of each input byte and one write of each output byte reach memory.

    Args:
        out: where the result goes (any floating dtype, the inputs' shape); None: a new tensor of
            the accumulation dtype.

    Example:
        >>> weighted_sum([torch.ones(2, dtype=torch.bfloat16), torch.zeros(2)], [0.25, 0.75])
        tensor([0.2500, 0.2500])
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    dtype = accumulation_dtype([t.dtype for t in tensors], out.dtype if out is not None else None)
    if out is None:
        out = torch.empty(tensors[0].shape, dtype=dtype)
    if out.dtype == dtype:
        _accumulate(out, tensors, weights, divisor)
        return out
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    if scratch is None or scratch.dtype != dtype or scratch.numel() < CHUNK_ELEMENTS:
        scratch = torch.empty(CHUNK_ELEMENTS, dtype=dtype)
    size = scratch.numel()
    for start in range(0, flat_out.numel(), size):
        stop = min(start + size, flat_out.numel())
        accumulator = scratch[:stop - start]
        _accumulate(accumulator, [flat[start:stop] for flat in flats], weights, divisor)
        flat_out[start:stop].copy_(accumulator)
    return out


def _accumulate(total: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], divisor: float) -> None:
    total.copy_(tensors[0])
    if weights[0] != 1.0:
        total.mul_(weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor, alpha=weight)  # mixed dtypes computed in the accumulator's, no temporary
    if divisor != 1.0:
        total.div_(divisor)


def weighted_combine(weights: list[float], *, divisor: float = 1.0) -> Combine:
    """The combine of Σ w_i t_i / divisor over row blocks (`weighted_sum`), each streaming thread with an
    accumulator chunk of its own, reused from block to block. Coefficients that are ratios of small
    integers are summed as those integers, divided once (mergecli/exact.py)."""
    exact = common_fraction([*weights, divisor])
    if exact is not None and exact[0][-1] != 0.0:
        weights, divisor = exact[0][:-1], exact[0][-1]

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        dtype = accumulation_dtype([b.dtype for b in blocks], out.dtype)
        return weighted_sum(blocks, weights, divisor=divisor, out=out,
                            scratch=thread_buffer(("accumulator", dtype), CHUNK_ELEMENTS, dtype))

    return combine


class Average(Method):
    """Weight ensembling: every floating tensor is the weighted average of the models' tensors."""

    name = "average"
    title = "weighted average"
    help = "θ = Σ wᵢ θᵢ: the weighted average of the models (weight ensembling)"
    mergekit = "linear"
    command = "average"
    copies_one_model = True

    def describe(self, recipe) -> list[str]:
        weights = "with the weights normalized to sum 1." if recipe.normalize else "with the weights as given."
        return [f"**Weighted average** of the parameters (weight ensembling): θ = Σ wᵢ θᵢ, {weights}", "",
                "- accumulated in float32 for 16-bit inputs and output, float64 otherwise"]


register(Average())
