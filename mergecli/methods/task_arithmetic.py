"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ_b + λ Σ w_i δ_i, with δ_i = θ_i − θ_b (divided by
Σ w_i when `normalize`, which is off by default: the weights scale the task vectors as given).

Rewritten as a weighted sum of the checkpoints themselves, θ = (1 − Σ c_i) θ_b + Σ c_i θ_i with
c_i = λ w_i (÷ Σ w_i), it is average's fused sum: each block read once, summed in float32 in the
cache, rounded once; no task vector is ever formed. Decimal weights and λ make the c_i (and 1 − Σ c_i)
ratios of small integers, summed as such (mergecli/exact.py).
"""

from __future__ import annotations

import math

from mergecli.exact import ratio
from mergecli.methods.average import weighted_combine
from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.task_vectors import LambdaSettings, TaskVectorMethod

PAPER = "https://arxiv.org/abs/2212.04089"


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    title = "task arithmetic merge"
    help = "θ = θ_base + λ Σ wᵢ (θᵢ − θ_base): the models' task vectors added to the base"
    mergekit = "task_arithmetic"
    settings = LambdaSettings
    normalize_default = False
    linear = True
    # mergekit's task arithmetic takes (and ignores: it sparsifies nothing) density and rescale
    mergekit_ignored = frozenset({"int8_mask", "density", "rescale"})
    kinds = {"task_arithmetic": "task arithmetic"}

    def task_for(self, recipe, inputs, task, read, shared, here):
        scale = here.settings.lambda_ / self.divisor(recipe, here)
        coefficients = [scale * weight for _, _, weight in read]
        base = 1.0 - math.fsum(coefficients)
        exact = [ratio(here.settings.lambda_), ratio(self.divisor(recipe, here)),
                 *(ratio(weight) for _, _, weight in read)]
        if None not in exact:  # 1 − Σ c_i as the exact fraction it is (mergecli/exact.py)
            lam, divisor, *weights = exact
            fractions = [lam * weight / divisor for weight in weights]
            coefficients, base = [float(c) for c in fractions], float(1 - sum(fractions))
        sources = [checkpoint for _, checkpoint, _ in read]
        if base != 0.0:  # λ Σ c = 1 (normalized, λ = 1): the base cancels out, and is not read
            sources, coefficients = [inputs.base, *sources], [base, *coefficients]
        return TensorTask(task.out, "task_arithmetic", tuple(sources), weighted_combine(coefficients),
                          task.block_elements, independent_blocks=True, t=task.t)

    def describe(self, recipe) -> list[str]:
        weights = "divided by their sum" if self.normalize(recipe) else "as given"
        return [f"**Task arithmetic** ([Ilharco et al., ICLR 2023]({PAPER})): θ = θ_base + λ Σ wᵢ (θᵢ − θ_base), "
                f"with the weights {weights}.", "", f"- λ (`lambda`): {shown_value(recipe.settings.lambda_)}",
                "- computed in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]


register(TaskArithmetic())
