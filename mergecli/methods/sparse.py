"""What the sparsifying task-vector methods share (DARE, DELLA, breadcrumbs): each model's task vector δ_i
is sparsified (entries dropped), the survivors rescaled, weighted, and then summed or merged by TIES' sign
election (`elect_signs`); θ = θ_b + λ × that (divided by the sum of the weights that count, with
`normalize`).

The rescale of the survivors:
- "density": × 1/density, as the DARE paper does;
- "l1" (mergekit's `rescale: true`): × Σ|δ_i| / Σ|sparse δ_i| over the tensor, so that each model's task
  vector keeps its L1 norm (left as it is where either sum is below 1e-7, as mergekit leaves it); the
  sums come from a streamed pass before the merge, in float64;
- false: none.

A method says how one tensor's task vectors are sparsified (`sparsifier`): a function that zeroes, in
place, the dropped entries of a block's vectors, and the prepasses it needs first (thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from mergecli.errors import RecipeError
from mergecli.exact import add_scaled_
from mergecli.methods.base import Prepass, TensorTask, shown_value
from mergecli.methods.statistics import Sums
from mergecli.methods.task_vectors import TaskVectorMethod, add_elected, deltas, shown_density

L1_FLOOR = 1e-7  # mergekit's: an L1 norm below it is not rescaled

# (a block's task vectors, flat, one per model read; the block's first element's flat position; whether this
# is the L1 pass, whose masks the merge may take again) → None: the dropped entries zeroed in place
Sparsify = Callable[..., None]


def rescale_kind(value: bool | str) -> str | None:
    """A `rescale` setting as "l1", "density" or None: true is mergekit's (the L1 norm kept)."""
    return "l1" if value is True else None if value is False else value


def l1_factors(total: torch.Tensor) -> list[float]:
    """Each model's L1 rescale from its (Σ|δ|, Σ|sparse δ|)."""
    return [float(before / after) if before >= L1_FLOOR and after >= L1_FLOOR else 1.0 for before, after in total]


class SparseMethod(TaskVectorMethod):
    """A task-vector method whose task vectors are sparsified, then rescaled, weighted and merged."""

    elect_signs: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    dropped: ClassVar[str] = ""  # how the entries are dropped, for the card

    def sparsifier(self, recipe, inputs, task, read, here, shared) -> tuple[Sparsify | None, tuple[Prepass, ...]]:
        """How one tensor's task vectors are sparsified (None: none is), and the prepasses that needs."""
        raise NotImplementedError

    def density_scales(self, here, read) -> list[float]:
        """The survivors' scale with `rescale = "density"`: 1/density of each model read."""
        return [1.0 / here.models[index].density for index, _, _ in read]

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        weights = [weight for _, _, weight in read]
        normalize = self.normalize(recipe)
        elect = self.elect_signs
        scale = settings.lambda_ * (1.0 if normalize and elect else 1.0 / self.divisor(recipe, here))
        sparsify, prepasses = self.sparsifier(recipe, inputs, task, read, here, shared)
        rescale = rescale_kind(settings.rescale) if sparsify is not None else None
        scales = self.density_scales(here, read) if rescale == "density" else [1.0] * len(read)
        factors = [weight * s for weight, s in zip(weights, scales)]
        if rescale == "l1":
            def sums(blocks: list[torch.Tensor], start: int) -> torch.Tensor:
                vectors = deltas(blocks, task.out.dtype)[1]
                before = [vector.abs().sum(dtype=torch.float64) for vector in vectors]
                sparsify(vectors, start, remember=True)
                return torch.stack([torch.stack([b, vector.abs().sum(dtype=torch.float64)])
                                    for b, vector in zip(before, vectors)])

            def settle(total: torch.Tensor) -> None:
                factors[:] = [weight * factor for weight, factor in zip(weights, l1_factors(total))]

            prepasses = (*prepasses, Sums(f"{self.title}: L1 norms", sums, settle))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks, out.dtype)
            if sparsify is not None:
                sparsify(vectors, start)
            for vector, factor in zip(vectors, factors):
                if factor != 1.0:
                    vector.mul_(factor)
            if elect:
                return add_elected(base, vectors, weights, normalize=normalize, scale=scale).view(out.shape)
            total = vectors[0]
            for vector in vectors[1:]:
                total.add_(vector)
            return add_scaled_(base, total, scale).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return self.made(task, sources, combine, prepasses)

    def made(self, task: TensorTask, sources, combine, prepasses) -> TensorTask:
        """The tensor's task (a method may change how its blocks are cut)."""
        return TensorTask(task.out, self.name, sources, combine, task.block_elements, independent_blocks=True,
                          positional=True, prepasses=prepasses, t=task.t)

    def rescale_line(self, recipe) -> str:
        kind = rescale_kind(recipe.settings.rescale)
        return {"l1": "each task vector rescaled to keep its L1 norm (mergekit's rescale)",
                "density": "the survivors rescaled by 1/density", None: "no rescale"}[kind]

    def describe(self, recipe) -> list[str]:
        then = ("a sign is elected per entry as in TIES and the agreeing entries are "
                + ("averaged" if self.normalize(recipe) else "summed")) if self.elect_signs else \
            "the weighted task vectors are " + ("averaged" if self.normalize(recipe) else "summed")
        return [f"**{self.title}** ({self.paper}): {self.dropped}; {then}; θ = θ_base + λ × that.", "",
                f"- density (fraction kept): {shown_density(recipe)}", f"- rescale: {self.rescale_line(recipe)}",
                *self.setting_lines(recipe), f"- λ (`lambda`): {shown_value(recipe.settings.lambda_)}",
                "- computed in float32 for 16-bit inputs and output, float64 otherwise; rounded once"]

    def setting_lines(self, recipe) -> list[str]:
        """The card's lines for the method's own settings."""
        return []


def refuse(recipe, key: str, problem: str) -> RecipeError:
    """A recipe error about one of the method's keys, located in the recipe."""
    return RecipeError(recipe.source, [recipe.locate(f"{recipe.method}.{key}: {problem}")])
