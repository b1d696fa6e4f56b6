"""Reinforced Agent Merging (RAM and RAM+ tensor-local, arXiv 2601.13572), as mergekit 0.1.5 defines them.
With task vectors δ_i = θ_i − θ_b, an entry counts for model i where |δ_i| > epsilon (m_i), and c = Σ_i m_i
models count for it:

    ram:         θ = θ_b + Σ_i m_i δ_i / max(c, 1)
    ramplus_tl:  θ = θ_b + Σ_i m_i δ_i · (λ_i where c = 1, else 1 / c),   λ_i = 1 + r · clamp(ρ_i, 0, alpha)

where ρ_i = (entries of the tensor model i shares with another) / max(entries only it changes, epsilon): a
model whose changes are mostly shared has its own entries scaled up. The counts come from a streamed pass
over the tensor's row blocks. The models' weights are not used.
"""

from __future__ import annotations

import torch

from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.statistics import Sums
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying

PAPER = "https://arxiv.org/abs/2601.13572"


class RamSettings(StrictModel):
    """`[ram]`: the magnitude below which an entry is not a change."""

    epsilon: Varying(float, ge=0.0, allow_inf_nan=False) = 1e-5


class RamPlusSettings(RamSettings):
    """`[ramplus_tl]`: epsilon, and how much a model's own entries are scaled up (`r`, at most `alpha` of ρ)."""

    r: Varying(float, allow_inf_nan=False) = 0.1
    alpha: Varying(float, allow_inf_nan=False) = 0.2


def changed(vectors: list[torch.Tensor], epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(m_i δ_i for each model, in place; c, how many models change each entry)."""
    counts = None
    for vector in vectors:
        mask = (vector.abs() > epsilon).to(vector.dtype)
        vector.mul_(mask)
        counts = mask if counts is None else counts.add_(mask)
    return vectors, counts


class Ram(TaskVectorMethod):
    name = "ram"
    title = "RAM merge"
    help = "task vectors summed, an entry several models change divided by how many change it"
    mergekit = "ram"
    settings = RamSettings
    uses_weights = False
    kinds = {"ram": "RAM"}

    def task_for(self, recipe, inputs, task, read, shared, here):
        epsilon = here.settings.epsilon

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            vectors, counts = changed(vectors, epsilon)
            total = vectors[0]
            for vector in vectors[1:]:
                total.add_(vector)
            return base.add_(total.div_(counts.clamp_(min=1))).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, self.name, sources, combine, task.block_elements, independent_blocks=True,
                          t=task.t)

    def describe(self, recipe) -> list[str]:
        return [f"**RAM** ([arXiv 2601.13572]({PAPER})): θ = θ_base + Σᵢ mᵢ δᵢ / max(c, 1), where mᵢ marks the entries "
                "model i changes by more than epsilon and c counts the models that change each entry.", "",
                f"- epsilon: {shown_value(recipe.settings.epsilon)}",
                "- computed in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]


class RamPlus(Ram):
    name = "ramplus_tl"
    title = "RAM+ (tensor-local) merge"
    help = "RAM, with each model's own entries scaled up by how much of its change it shares"
    mergekit = "ramplus_tl"
    settings = RamPlusSettings
    kinds = {"ramplus_tl": "RAM+"}

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        epsilon = settings.epsilon
        scales: list[float] = []

        def counts(blocks: list[torch.Tensor], start: int) -> torch.Tensor:
            vectors, count = changed(deltas(blocks, task.out.dtype)[1], epsilon)
            unique = (count == 1).to(torch.float64)
            overlap = (count > 1).to(torch.float64)
            marks = [(vector != 0).to(torch.float64) for vector in vectors]
            return torch.tensor([[float(mark.dot(overlap)), float(mark.dot(unique))] for mark in marks],
                                dtype=torch.float64)

        def settle(total: torch.Tensor) -> None:
            rho = total[:, 0] / total[:, 1].clamp(min=epsilon)
            scales.extend((1 + settings.r * rho.clamp(min=0, max=settings.alpha)).tolist())

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            vectors, count = changed(vectors, epsilon)
            plain = torch.zeros_like(vectors[0])
            scaled = torch.zeros_like(vectors[0])
            for vector, scale in zip(vectors, scales):
                plain.add_(vector)
                scaled.add_(vector, alpha=scale)
            merged = torch.where(count == 1, scaled, plain.div_(count.clamp(min=1)))
            return base.add_(merged).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, self.name, sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=(Sums("RAM+ shared and own entries", counts, settle),), t=task.t)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        return [f"**RAM+ (tensor-local)** ([arXiv 2601.13572]({PAPER})): as RAM, but an entry only model i changes is "
                "scaled by λᵢ = 1 + r · clamp(ρᵢ, 0, alpha), ρᵢ the ratio of the entries it shares to those it alone "
                "changes in the tensor.", "", f"- epsilon: {shown_value(settings.epsilon)}, r: "
                f"{shown_value(settings.r)}, alpha: {shown_value(settings.alpha)}",
                "- counts exact, the merge in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]


register(Ram())
register(RamPlus())
