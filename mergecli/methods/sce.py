"""SCE: select, calculate, erase (FuseChat 2.0, Wan et al. 2024), as mergekit 0.1.5 defines it. With task
vectors δ_i = θ_i − θ_b of a tensor:

- select (`select_topk` < 1): keep the entries whose variance across the models, var_i(δ_i) (population
  variance), is among the k = ⌊select_topk · (entries of nonzero variance)⌋ largest; the others are 0 in
  every δ_i;
- calculate: each model's weight w_i = mean(δ_i²) / Σ_j mean(δ_j²) over the tensor (1/K each where that
  sum is below 1e-6);
- erase: per entry, the sign of Σ_i δ_i is elected (≥ 0 counts as +), and the models whose entry has that
  sign (a zero has none) count: θ = θ_b + Σ_i w_i e_i δ_i / max(Σ_i w_i e_i, 1e-6).

The variance cut is exact (equal variances ordered by position) and streamed (methods/trims.py): a count
of the nonzero variances, then the cut's passes; the weights come from one more pass; none holds a tensor.
The models' weights are not used (SCE computes its own).
"""

from __future__ import annotations

import math

import torch

from mergecli.io.buffers import thread_buffer
from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.bracket import sample_share
from mergecli.methods.statistics import Sums
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.methods.trims import Population, row_blocks, sample_plan, trim_passes
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying

PAPER = "https://arxiv.org/abs/2408.07990"
FLOOR = 1e-6  # mergekit's: below it, the weights' sum is not divided by, nor is an entry's


class SceSettings(StrictModel):
    """`[sce]`: the share of entries of largest variance kept (1: all)."""

    select_topk: Varying(float, ge=0.0, le=1.0, allow_inf_nan=False) = 1.0


def variance(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the models of each entry (flat), as float32 whatever the vectors'
    dtype (the cut's passes and the merge must see the same values): summed in float64 and rounded once,
    which is what torch.var gives (mergekit's), at a fifth of its time on a CPU."""
    size = vectors[0].numel()
    mean = thread_buffer("sce-mean", size, torch.float64).copy_(vectors[0].float())
    for vector in vectors[1:]:
        mean.add_(vector.float())
    mean.div_(len(vectors))
    total = thread_buffer("sce-total", size, torch.float64).zero_()
    part = thread_buffer("sce-part", size, torch.float64)
    for vector in vectors:
        torch.sub(part.copy_(vector.float()), mean, out=part)
        total.addcmul_(part, part)
    return total.div_(len(vectors)).float()


class Sce(TaskVectorMethod):
    name = "sce"
    title = "SCE merge"
    help = "entries of largest variance across models kept, models weighted by their energy, signs elected"
    mergekit = "sce"
    settings = SceSettings
    uses_weights = False
    kinds = {"sce": "SCE"}

    def task_for(self, recipe, inputs, task, read, shared, here):
        topk = here.settings.select_topk
        size = task.out.numel
        selecting = topk < 1.0
        cut: list[tuple[Population, int, int]] = []  # filled once the nonzero variances are counted
        share = sample_share(size)
        sample = sample_plan(task, share)
        nothing = {"kept": topk <= 0.0}
        weights: list[float] = []

        def variances(blocks: list[torch.Tensor], start: int) -> list[torch.Tensor]:
            return [variance(deltas(blocks)[1])]

        def count(blocks: list[torch.Tensor], start: int) -> torch.Tensor:
            return torch.count_nonzero(variances(blocks, start)[0]).to(torch.float64).view(1)

        def settle_count(total: torch.Tensor) -> None:
            k = int(int(total[0]) * topk)
            nothing["kept"] = nothing["kept"] or k == 0
            if not nothing["kept"]:
                cut.append((Population(size, 1.0, 1, sample, k=k), 0, 0))

        def select(vectors: list[torch.Tensor], start: int) -> list[torch.Tensor]:
            if selecting:
                if nothing["kept"]:
                    for vector in vectors:
                        vector.zero_()
                else:
                    kept = cut[0][0].trim.trim_(variance(vectors), start).sign_()
                    for vector in vectors:
                        vector.mul_(kept)
            return vectors

        def energies(blocks: list[torch.Tensor], start: int) -> torch.Tensor:
            vectors = select(deltas(blocks, task.out.dtype)[1], start)
            return torch.stack([vector.square().sum(dtype=torch.float64) for vector in vectors])

        def settle_weights(total: torch.Tensor) -> None:
            means = (total / size).tolist()
            whole = math.fsum(means)
            weights.extend([1.0 / len(means)] * len(means) if abs(whole) < FLOOR else [m / whole for m in means])

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            vectors = select(vectors, start)
            total = torch.stack(vectors).sum(dim=0)
            sign = torch.copysign(torch.ones((), dtype=total.dtype), total)
            numerator = torch.zeros_like(total)
            denominator = torch.zeros_like(total)
            for vector, weight in zip(vectors, weights):
                agrees = torch.mul(vector, sign).clamp_(min=0).sign_()
                numerator.addcmul_(agrees, vector, value=weight)
                denominator.add_(agrees, alpha=weight)
            return base.add_(numerator.div_(denominator.clamp_(min=FLOOR))).view(out.shape)

        block = task.out.elements(row_blocks(task)[0])
        prepasses = ((Sums("SCE: nonzero variances", count, settle_count),
                      *trim_passes(cut, share, block, values=variances, label="SCE variance cut"))
                     if selecting and topk > 0 else ())
        prepasses = (*prepasses, Sums("SCE weights", energies, settle_weights))
        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, "sce", sources, combine, task.block_elements, independent_blocks=True,
                          positional=True, prepasses=prepasses, t=task.t)

    def describe(self, recipe) -> list[str]:
        return [f"**SCE** ([Wan et al. 2024]({PAPER})): the entries of largest variance across the task vectors "
                "δᵢ = θᵢ − θ_base are kept (select_topk), each model weighted by its task vector's mean square, a sign "
                "elected per entry, and the agreeing entries averaged by weight.", "",
                f"- select_topk: {shown_value(recipe.settings.select_topk)}",
                "- the variance cut exact, equal variances ordered by position; computed in float32 (float64 for "
                "float64 inputs), rounded once"]


register(Sce())
