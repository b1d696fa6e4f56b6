"""Multi-SLERP (Goddard), as mergekit 0.1.5 defines it: barycentric interpolation of K ≥ 2 models on the
sphere, of their task vectors τ_i = θ_i − θ_b when the recipe has a base (else of the models, τ_i = θ_i),
with weights w_i (divided by their sum, with `normalize_weights`, the default):

    u_i = τ_i / (‖τ_i‖ + eps),  m = Σ w_i u_i / ‖Σ w_i u_i‖,  g = Σ w_i (u_i − ⟨u_i, m⟩ m)
    θ = θ_b + (Σ w_i ‖τ_i‖) · (cos(‖g‖ + eps) m + sin(‖g‖ + eps) / (‖g‖ + eps) · g)

(θ_b: 0 without a base). Where ‖Σ w_i u_i‖ < eps, two models are interpolated linearly (Σ w_i τ_i) and more
are refused, as mergekit does, but where every τ_i is 0 (no model changes the tensor) the base is kept.
Every vector above is in the span of the τ_i: the formula is computed on K
coefficients in float64, from the Gram matrix of the task vectors (one streamed pass over each tensor's
row blocks), and the merge is one weighted sum.
"""

from __future__ import annotations

import math

import torch

from mergecli.errors import MergecliError, RecipeError, shown
from mergecli.methods.average import weighted_combine
from mergecli.methods.base import TensorTask, register
from mergecli.methods.statistics import Sums, gram
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.recipe import StrictModel

REFERENCE = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"


class MultiSlerpSettings(StrictModel):
    """`[multislerp]`: whether the weights are divided by their sum, and the eps of the norms."""

    normalize_weights: bool = True
    eps: float = 1e-8


def multislerp_coefficients(grams: torch.Tensor, weights: list[float], eps: float) -> list[float] | None:
    """The coefficient of each τ_i in the merged task vector, from their Gram matrix (float64, K × K); None
    where the weighted mean of the unit vectors vanishes and K > 2."""
    w = torch.tensor(weights, dtype=torch.float64)
    norms = grams.diagonal().clamp(min=0).sqrt()
    scaled = norms + eps
    units = grams / torch.outer(scaled, scaled)

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    length = norm(w)
    if length < eps:
        if not bool((norms > 0).any()):
            return [0.0] * len(weights)  # no model changes the tensor: the base
        return weights if len(weights) == 2 else None
    mean = w / length
    dots = units @ mean
    tangent = w - float(w @ dots) * mean
    size = norm(tangent) + eps
    direction = math.cos(size) * mean + (math.sin(size) / size) * tangent
    average = float(norms @ w)
    return (average * direction / scaled).tolist()


class MultiSlerp(TaskVectorMethod):
    name = "multislerp"
    title = "Multi-SLERP merge"
    help = "barycentric interpolation of several models (or of their task vectors) on the sphere"
    mergekit = "multislerp"
    settings = MultiSlerpSettings
    needs_base = False
    normalize_default = False
    kinds = {"multislerp": "Multi-SLERP"}

    def check(self, recipe) -> None:
        if len(recipe.models) < 2:
            raise RecipeError(recipe.source, ["models: multislerp interpolates several models, the recipe has one "
                                              "(add a model, or copy it with `average`)"])

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        weights = [here.weights[index] for index, _, _ in read]
        if settings.normalize_weights:
            total = math.fsum(weights)
            weights = [w / total for w in weights]
        has_base = inputs.base is not None
        sources = (*([inputs.base] if has_base else []), *(checkpoint for _, checkpoint, _ in read))
        merge: dict[str, object] = {}

        def vectors(blocks: list[torch.Tensor]) -> list[torch.Tensor]:
            return deltas(blocks, task.out.dtype)[1] if has_base else blocks

        def settle(total: torch.Tensor) -> None:
            found = multislerp_coefficients(total, weights, settings.eps)
            if found is None:
                raise MergecliError(f"{shown(task.out.name)}: multislerp: the weighted mean of the models' directions "
                                 "is zero (opposite models whose weights cancel out); change the weights")
            merge["c"] = found
            merge["combine"] = weighted_combine(found)

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            if not has_base:
                return merge["combine"](blocks, out)
            base, taus = deltas(blocks, out.dtype)
            for tau, c in zip(taus, merge["c"]):
                base.add_(tau, alpha=c)
            return base.view(out.shape)

        stats = Sums("Multi-SLERP: Gram matrices", lambda blocks, start: gram(vectors(blocks)), settle)
        return TensorTask(task.out, "multislerp", sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=(stats,), t=task.t)

    def describe(self, recipe) -> list[str]:
        what = "the task vectors δᵢ = θᵢ − θ_base (added to the base)" if recipe.base is not None else "the models"
        weights = "divided by their sum" if recipe.settings.normalize_weights else "as given"
        return [f"**Multi-SLERP** ([Goddard]({REFERENCE})): barycentric interpolation of {what} on the sphere, with "
                f"the weights {weights}, scaled by their weighted mean norm.", "",
                "- computed on the K coefficients in float64 from each tensor's Gram matrix; the merge in float32 "
                "for 16-bit inputs and output, float64 otherwise; rounded once"]


register(MultiSlerp())
