"""Model Stock (Jang et al., ECCV 2024), as mergekit 0.1.5 defines it: with task vectors δ_i = θ_i − θ_b of
k ≥ 2 models against the base,

    cos θ = mean over pairs i < j of  ⟨δ_i, δ_j⟩ / max(‖δ_i‖ ‖δ_j‖, 1e-6),  clamped to [−1, 1]
    t = k cos θ / (1 + (k − 1) cos θ)            (t = 0 where |1 + (k − 1) cos θ| < 1e-6)
    θ = t · mean_i θ_i + (1 − t) · θ_b  =  θ_b + t · mean_i δ_i

per tensor, or, with `filter_wise = true`, per row (each vector along the last dimension; a 1-D tensor is
one). A tensor's dot products come from a streamed pass over its row blocks (methods/statistics.py), in
float64; a row's from its block. The models' weights are not used (every model counts alike).
"""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods.average import PRECISION
from mergecli.methods.base import TensorTask, register
from mergecli.methods.statistics import Sums, gram, row_view
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.recipe import StrictModel

PAPER = "https://arxiv.org/abs/2403.19522"
SINGULAR = 1e-6  # mergekit's: a denominator below it keeps the base


class ModelStockSettings(StrictModel):
    """`[model_stock]`: the ratio per tensor, or per row (`filter_wise`)."""

    filter_wise: bool = False


def ratio(dots: torch.Tensor) -> torch.Tensor:
    """t from the Gram matrices of the task vectors (…, k, k): one t per matrix."""
    k = dots.shape[-1]
    norms = dots.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    upper = torch.triu_indices(k, k, offset=1)
    products = (norms[..., upper[0]] * norms[..., upper[1]]).clamp(min=1e-6)
    cos = (dots[..., upper[0], upper[1]] / products).clamp(-1, 1).mean(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1.0, denominator))


class ModelStock(TaskVectorMethod):
    name = "model_stock"
    title = "Model Stock merge"
    help = "the models' mean pulled toward the base by the angle between their task vectors (k ≥ 2 models)"
    mergekit = "model_stock"
    settings = ModelStockSettings
    uses_weights = False
    kinds = {"model_stock": "Model Stock"}

    def check(self, recipe) -> None:
        super().check(recipe)
        if len(recipe.models) < 2:
            raise RecipeError(recipe.source, [f"models: model_stock takes the angle between task vectors: it needs at "
                                              f"least 2 models beside the base, the recipe has {len(recipe.models)}"])

    def task_for(self, recipe, inputs, task, read, shared, here):
        k = len(read)
        shape = task.out.shape
        per_row = here.settings.filter_wise and len(shape) > 1

        def row_ratios(vectors: list[torch.Tensor]) -> torch.Tensor:
            rows = torch.stack([row_view(vector, shape) for vector in vectors], dim=1).double()  # rows, k, n
            return ratio(rows @ rows.transpose(1, 2)).to(vectors[0].dtype)

        found: dict[str, float] = {}
        stats = None if per_row else Sums("Model Stock angles",
                                          lambda blocks, start: gram(deltas(blocks, task.out.dtype)[1]),
                                          lambda total: found.update(t=float(ratio(total))))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            t = row_ratios(vectors).unsqueeze(-1) / k if per_row else found["t"] / k
            total = vectors[0]
            for vector in vectors[1:]:
                total.add_(vector)
            if per_row:
                row_view(total, shape).mul_(t)
                return base.add_(total).view(out.shape)
            return base.add_(total, alpha=t).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, "model_stock", sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=() if per_row else (stats,), t=task.t)

    def describe(self, recipe) -> list[str]:
        scope = "each row" if recipe.settings.filter_wise else "each tensor"
        return [f"**Model Stock** ([Jang et al., ECCV 2024]({PAPER})): θ = θ_base + t · mean δᵢ, with "
                "t = k cos θ / (1 + (k − 1) cos θ) and cos θ the mean cosine between the task vectors "
                f"δᵢ = θᵢ − θ_base, taken for {scope}.", "",
                f"- angles in float64, the merge {PRECISION}; rounded once"]


register(ModelStock())
