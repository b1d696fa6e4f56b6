"""The Karcher mean (arXiv 2603.04972), as mergekit 0.1.5 defines it: the models (and the base, when the
recipe has one: mergekit counts it as one more model) are points x_i, each the norm n_i = ‖x_i‖ times a unit
vector u_i; the mean direction m on the sphere is found by Riemannian gradient steps from the normalized
mean of the u_i (with alphas α_i = 1/K, over the points of norm above `tol`):

    θ_i = arccos⟨m, u_i⟩,   g = Σ_i α_i θ_i / sin θ_i · (u_i − ⟨m, u_i⟩ m)   (θ_i < tol: left out)
    m ← cos‖g‖ · m + sin‖g‖ · g / ‖g‖,  then normalized;  `max_iter` steps, or until ‖g‖ < tol

and θ = (Σ_i α_i n_i) · m.

m stays in the span of the u_i, so it is a vector of K coefficients: every step above is done on them in
float64, with the Gram matrix ⟨x_i, x_j⟩ from one streamed pass over each tensor's row blocks; the merge
is then one weighted sum of the inputs, like an average. The models' weights are not used.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mergecli.errors import RecipeError
from mergecli.methods.average import weighted_combine
from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.statistics import Sums, gram
from mergecli.methods.task_vectors import TaskVectorMethod
from mergecli.recipe import StrictModel

PAPER = "https://arxiv.org/abs/2603.04972"


class KarcherSettings(StrictModel):
    """`[karcher]`: the most gradient steps, and the tolerance that ends them."""

    max_iter: int = Field(default=10, ge=0)
    tol: float = Field(default=1e-5, gt=0, allow_inf_nan=False)


def karcher_coefficients(grams: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """The coefficient of each point x_i in the Karcher mean, from their Gram matrix (float64, K × K)."""
    count = grams.shape[0]
    alphas = [1.0 / count] * count
    norms = grams.diagonal().clamp(min=0).sqrt()
    if count == 1:
        return [1.0]
    valid = [i for i in range(count) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * count
    weights = torch.tensor([alphas[i] for i in valid], dtype=torch.float64)
    weights /= weights.sum()
    picked = norms[valid]
    units = grams[valid][:, valid] / torch.outer(picked, picked)  # ⟨u_i, u_j⟩

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = weights.clone()
    length = norm(mean)
    mean = torch.nn.functional.one_hot(torch.tensor(0), len(valid)).double() if length < tol else mean / length
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros_like(mean)
        for i, (weight, dot) in enumerate(zip(weights.tolist(), dots.tolist())):
            theta = math.acos(dot)
            if theta < tol:
                continue
            step = -dot * mean
            step[i] += 1.0
            tangent += weight * (theta / math.sin(theta)) * step
        length = norm(tangent)
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * (tangent / length)
        unit = norm(mean)
        if unit > tol:
            mean = mean / unit
    scale = math.fsum(alpha * float(n) for alpha, n in zip(alphas, norms))
    coefficients = [0.0] * count
    for i, c in zip(valid, mean.tolist()):
        coefficients[i] = scale * c / float(norms[i])
    return coefficients


class Karcher(TaskVectorMethod):
    name = "karcher"
    title = "Karcher mean merge"
    help = "the models' Riemannian (Karcher) mean on the sphere, scaled by their mean norm"
    mergekit = "karcher"
    settings = KarcherSettings
    needs_base = False
    uses_weights = False
    kinds = {"karcher": "Karcher mean"}

    def check(self, recipe) -> None:
        if len(recipe.models) + (recipe.base is not None) < 2:
            raise RecipeError(recipe.source, ["models: karcher takes the mean of several models, the recipe has one "
                                              "(add a model, or copy it with `average`)"])

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        sources = (*([inputs.base] if inputs.base is not None else []), *(checkpoint for _, checkpoint, _ in read))
        merge: dict[str, object] = {}

        def settle(total: torch.Tensor) -> None:
            merge["combine"] = weighted_combine(karcher_coefficients(total, settings.max_iter, settings.tol))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            return merge["combine"](blocks, out)

        stats = Sums("Karcher: Gram matrices", lambda blocks, start: gram(blocks), settle)
        return TensorTask(task.out, "karcher", sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=(stats,), t=task.t)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        return [f"**Karcher mean** ([arXiv 2603.04972]({PAPER})): the models' mean direction on the unit sphere, "
                "found by Riemannian gradient steps from their normalized mean, scaled by their mean norm"
                + (" (the base counts as one more model)" if recipe.base is not None else "") + ".", "",
                f"- max_iter: {settings.max_iter}, tol: {shown_value(settings.tol)}",
                "- the steps on the K coefficients in float64, from each tensor's Gram matrix; the merge in float32 "
                "for 16-bit inputs and output, float64 otherwise; rounded once"]


register(Karcher())
