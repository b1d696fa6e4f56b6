"""Arcee Fusion, as mergekit 0.1.5 defines it: the base θ_b and one model θ₁; each entry's importance is

    s = |θ₁ − θ_b| · KL(p ‖ q),   p = softmax(θ₁) + 1e-8,  q = softmax(θ_b) + 1e-8   (KL at least 0)

(the softmax and the divergence taken along each row's last dimension; a 1-D tensor is one row), and the
model's change is kept where s ≥ median(s) + 1.5 · (Q3(s) − Q1(s)):  θ = θ_b + (θ₁ − θ_b) · [s ≥ that].

The quantiles are exact: the sorted values at ⌊q · (n − 1)⌋ (mergekit estimates them from a random sample
of a million entries with replacement, on a tensor larger than that, so its result varies from run to
run), each a top-k cut of the streamed scores (methods/trims.py) on a tensor of more than one block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mergecli.errors import RecipeError
from mergecli.methods.base import TensorTask, register
from mergecli.methods.bracket import sample_share
from mergecli.methods.magnitude import _as_float
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.methods.trims import Population, row_blocks, sample_plan, trim_passes

REFERENCE = "https://arcee.ai"
QUANTILES = (0.25, 0.5, 0.75)
SMOOTHING = 1e-8  # mergekit's: added to each probability


def importance(blocks: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """s of each entry of a block (flat), from the base's and the model's blocks, in float32 (float64 for
    float64 inputs), as mergekit computes it; but a divergence that rounding made negative (rows the model
    barely changed) is 0, as it is exactly: the scores are never below 0, and the cuts count magnitudes."""
    dtype = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
    rows = (-1, shape[-1]) if len(shape) > 1 else (1, -1)
    base, model = (block.to(dtype).reshape(rows) for block in blocks)
    p = F.softmax(model, dim=-1) + SMOOTHING
    q = F.softmax(base, dim=-1) + SMOOTHING
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True).clamp_(min=0)
    return ((model - base).abs() * divergence).reshape(-1)


def threshold(q1: float, median: float, q3: float, dtype: torch.dtype) -> torch.Tensor:
    """median + 1.5 (Q3 − Q1), in the scores' dtype, as mergekit computes it."""
    q1_, median_, q3_ = (torch.tensor(v, dtype=dtype) for v in (q1, median, q3))
    return median_ + 1.5 * (q3_ - q1_)


def places(size: int) -> list[int]:
    """The sorted indices of the quantiles in a tensor of `size`."""
    return [math.floor(q * (size - 1)) for q in QUANTILES]


class ArceeFusion(TaskVectorMethod):
    name = "arcee_fusion"
    title = "Arcee Fusion merge"
    help = "the base, with one model's changes kept where their importance (|change| × KL) is an outlier"
    mergekit = "arcee_fusion"
    uses_weights = False
    kinds = {"arcee_fusion": "Arcee Fusion"}

    def check(self, recipe) -> None:
        super().check(recipe)
        if len(recipe.models) != 1:
            raise RecipeError(recipe.source, [f"models: arcee_fusion fuses one model into the base, the recipe has "
                                              f"{len(recipe.models)}"])

    def task_for(self, recipe, inputs, task, read, shared, here):
        shape = task.out.shape
        size = task.out.numel
        sources = (inputs.base, read[0][1])
        blocks = row_blocks(task)
        whole = len(shape) == 1 or blocks == [None]  # one block: the quantiles sorted there
        cuts: list[tuple[Population, int, int]] = []
        if not whole:
            share = sample_share(size)
            sample = sample_plan(task, share)
            cuts = [(Population(size, 1.0, 1, sample, k=size - place), 0, 0) for place in places(size)]

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            scores = importance(blocks, shape)
            if whole:
                ordered = torch.sort(scores).values
                cut = threshold(*(float(ordered[place]) for place in places(size)), scores.dtype)
            else:
                cut = threshold(*(_as_float(population.trim.threshold) for population, _, _ in cuts), scores.dtype)
            base, (delta,) = deltas(blocks, out.dtype)
            return base.add_(delta.mul_(scores >= cut)).view(out.shape)

        prepasses = () if whole else trim_passes(cuts, sample_share(size), task.out.elements(blocks[0]),
                                                 values=lambda blocks, start: [importance(blocks, shape)],
                                                 label="Arcee Fusion quantiles")
        return TensorTask(task.out, "arcee_fusion", sources, combine,
                          task.out.numel if len(shape) == 1 else task.block_elements, independent_blocks=True,
                          positional=True, prepasses=prepasses, t=task.t)

    def describe(self, recipe) -> list[str]:
        return [f"**Arcee Fusion** ([Arcee]({REFERENCE})): the model's changes θ₁ − θ_base are kept where their "
                "importance |θ₁ − θ_base| · KL(softmax θ₁ ‖ softmax θ_base) (per row) reaches median + 1.5 · IQR of "
                "the tensor's.", "",
                "- the quantiles exact; computed in float32 for 16-bit inputs and output, float64 otherwise; "
                "rounded once"]


register(ArceeFusion())
