"""The RegMean solve of one linear weight, as a streaming task: W_Mᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ with
the models' Gram matrices read one layer at a time (from the statistics store, or from RegMean++'s
per-block scratch store), the weight streamed in row blocks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mergecli.errors import shown
from mergecli.io.checkpoint import Checkpoint
from mergecli.methods.base import FLOPS_PER_BYTE, Combine, TensorTask
from mergecli.methods.regmean.math import RegMeanAccumulator
from mergecli.recipe import Recipe
from mergecli.stats.layers import Orientation

WHOLE_TENSOR = sys.maxsize  # a Conv1D weight `[in, out]` is read whole: the solve mixes all its rows
BLOCK_ROWS = 256  # an nn.Linear weight is read in blocks of this many output rows
GramSource = Callable[[], tuple[torch.Tensor, int]]  # one model's Gram sum (d_in, d_in) and its token count


def keeps_grams(d_in: int, d_out: int, models: int) -> bool:
    """For a weight solved whole: hold the n Grams and solve in column blocks (a wide layer), or
    sum Σ G̃ Wᵀ as the models come?"""
    return models * d_in < d_out


def work_bytes(d_in: int, d_out: int, models: int, *, streamed: bool, block_rows: int) -> int:
    """Memory the solve of one layer allocates (float64), besides its weights and its output."""
    if streamed or keeps_grams(d_in, d_out, models):
        rows = block_rows if streamed else min(d_in, d_out)
        # the n G̃_i, Σ G̃ and its factor; per block: right-hand side, fallback, one Wᵀ, the solution
        return 8 * ((models + 2) * d_in * d_in + 4 * d_in * rows)
    # Σ G̃ and one model's G̃, the factor; Σ G̃ Wᵀ, Σ w Wᵀ, one Wᵀ and the solution
    return 8 * (3 * d_in * d_in + 4 * d_in * d_out)


@dataclass
class _LayerSolve:
    """A weight being merged block by block: its Grams (factored) and the rows done."""

    accumulator: RegMeanAccumulator | None = None
    rows: int = 0


def regmean_combine(name: str, sources: list[GramSource], weights: list[float], *, orientation: Orientation,
                    in_features: int, shape: tuple[int, ...], ratio: float,
                    warnings: list[str]) -> Combine:
    """The combine of one linear weight: W_Mᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ.

    An `nn.Linear` weight `[out, in]` arrives in row blocks, which are column blocks of Wᵀ: the
    layer's n Grams are read (one at a time) and Σ G̃ factored at its first block, each block is
    solved as it comes, and the Grams are dropped after its last. A Conv1D weight `[in, out]`
    arrives whole (its rows are the inputs the solve mixes). Results are written straight into
    tensors of the output dtype.
    """
    stream = _LayerSolve()

    def load(keep_grams: bool, weights_t: list[torch.Tensor] | None = None) -> RegMeanAccumulator:
        accumulator = RegMeanAccumulator(ratio=ratio, keep_grams=keep_grams)
        for i, (source, weight) in enumerate(zip(sources, weights)):
            gram, tokens = source()  # (d_in, d_in), the sum over `tokens` tokens
            accumulator.add(gram, weights_t[i] if weights_t else None, weight=weight, tokens=tokens)
            del gram
        return accumulator

    def report(accumulator: RegMeanAccumulator) -> None:
        factor = accumulator.factor
        if factor.failed:
            warnings.append(f"regmean: {shown(name)}: the system could not be solved; it is the weighted average")
        elif factor.ridge:
            warnings.append(f"regmean: {shown(name)}: the system was singular; solved with a ridge of "
                            f"{factor.ridge:g} × its diagonal, towards the weighted average")

    def combine(blocks: list[torch.Tensor], merged: torch.Tensor) -> torch.Tensor:
        if orientation == "out_in":
            if stream.accumulator is None:  # the first block of this weight
                stream.accumulator = load(keep_grams=True)
            stream.accumulator.solve_block([block.T for block in blocks], merged.T)
            stream.rows += blocks[0].shape[0]
            if stream.rows == shape[0]:  # the last block: drop the Grams
                report(stream.accumulator)
                stream.accumulator, stream.rows = None, 0
            return merged
        accumulator = load(keeps_grams(in_features, blocks[0].numel() // in_features, len(blocks)), blocks)
        accumulator.solve(merged)
        report(accumulator)
        return merged

    return combine


def regmean_task(task: TensorTask, sources: list[GramSource], recipe: Recipe, warnings: list[str], *,
                 models: tuple[Checkpoint, ...], orientation: Orientation, in_features: int,
                 kind: str = "regmean") -> TensorTask:
    """The task that solves one linear weight by RegMean instead of averaging it (`task`), from every
    model's weight (`models`, in recipe order: one per Gram source)."""
    name, shape = task.out.name, task.out.shape
    d_out = shape[0] * shape[1] // in_features
    weights = recipe.weights(normalize=recipe.normalize is not False)
    combine = regmean_combine(name, sources, weights, orientation=orientation, in_features=in_features, shape=shape,
                              ratio=recipe.settings.reduce_non_diagonal_ratio, warnings=warnings)
    streamed = orientation == "out_in"
    block = BLOCK_ROWS * in_features if streamed else WHOLE_TENSOR
    work = work_bytes(in_features, d_out, len(sources), streamed=streamed, block_rows=max(1, block // in_features))
    return TensorTask(task.out, kind, models, combine, block, work,
                      cost=solve_cost(in_features, d_out, len(sources)))


def solve_cost(d_in: int, d_out: int, models: int) -> float:
    """The work of one layer's solve beyond reading its weights, for progress: reading the n float64
    Grams, the Cholesky factorization (d³/3 flops), the right-hand sides Σ G̃ Wᵀ and the two triangular
    solves, flops counted as FLOPS_PER_BYTE bytes read."""
    flops = d_in ** 3 / 3 + (2 * models + 4) * d_in ** 2 * d_out
    return 8 * models * d_in ** 2 + flops / FLOPS_PER_BYTE
