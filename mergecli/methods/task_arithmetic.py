"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ_b + λ Σ w_i δ_i, with δ_i = θ_i − θ_b (divided by
Σ w_i when `normalize`, which is off by default: the weights scale the task vectors as given).
"""

from __future__ import annotations

import torch

from mergecli.methods.base import TensorTask, register
from mergecli.methods.task_vectors import LambdaSettings, TaskVectorMethod, deltas

PAPER = "https://arxiv.org/abs/2212.04089"


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    title = "task arithmetic merge"
    settings = LambdaSettings
    normalize_default = False
    kinds = {"task_arithmetic": "task arithmetic"}

    def task_for(self, recipe, inputs, task, read, shared):
        weights = [weight for _, _, weight in read]
        scale = recipe.settings.lambda_ / self.divisor(recipe)

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, vectors = deltas(blocks)
            total = torch.zeros_like(base)
            for vector, weight in zip(vectors, weights):
                total.add_(vector, alpha=weight)
            return base.add_(total, alpha=scale)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, "task_arithmetic", sources, combine, task.block_elements, independent_blocks=True)

    def describe(self, recipe) -> list[str]:
        weights = "divided by their sum" if self.normalize(recipe) else "as given"
        return [f"**Task arithmetic** ([Ilharco et al., ICLR 2023]({PAPER})): θ = θ_base + λ Σ wᵢ (θᵢ − θ_base), "
                f"with the weights {weights}.", "", f"- λ (`lambda`): {recipe.settings.lambda_:g}",
                "- computed in float32 (float64 for float64 inputs), rounded once"]


register(TaskArithmetic())
