"""NuSLERP, as mergekit 0.1.5 defines it: spherical interpolation of two models at t = w₂ / (w₁ + w₂) (their
weights; ½ where the weights sum to less than 1e-6 in magnitude), of their task vectors against the base
when the recipe has one (θ = θ_b + slerp(t, δ₁, δ₂)), else of the models themselves:

    slerp(t, a, b) = (sin((1 − t)Ω) a + sin(tΩ) b) / sin Ω,   cos Ω = ⟨a/‖a‖, b/‖b‖⟩   (norms at least 1e-7)

and (1 − t) a + t b where the two are colinear (1 − cos²Ω ≤ 1e-16). Over the whole tensor
(`nuslerp_flatten`, the default), or, with `nuslerp_flatten = false`, per row (each vector along the last
dimension), or with `nuslerp_row_wise = true` per column (each vector along the first dimension; mergekit's
name for it). A tensor's or a column's sums come from a streamed pass over its row blocks, a row's from its
block, in float64.
"""

from __future__ import annotations

import torch

from mergecli.errors import RecipeError
from mergecli.methods.average import PRECISION, accumulation_dtype
from mergecli.methods.base import TensorTask, register, settings_at
from mergecli.methods.statistics import Sums, row_view
from mergecli.methods.task_vectors import TaskVectorMethod, deltas
from mergecli.recipe import StrictModel

SMALLEST_NORM = 1e-7  # mergekit's floor on a norm
COLINEAR = 1e-16  # mergekit's: (1e-8)², the least 1 − cos²Ω of an angle


class NuSlerpSettings(StrictModel):
    """`[nuslerp]`: over the whole tensor (the default), per row, or per column."""

    nuslerp_flatten: bool = True
    nuslerp_row_wise: bool = False


def coefficients(sums: torch.Tensor, t: float) -> torch.Tensor:
    """The two coefficients of slerp (…, 2) from Σa², Σb², Σab (…, 3), in float64."""
    norms = sums[..., :2].clamp(min=0).sqrt().clamp(min=SMALLEST_NORM)
    cos = (sums[..., 2] / (norms[..., 0] * norms[..., 1])).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR
    omega = torch.acos(torch.where(colinear, 0.0, cos))
    sine = torch.sin(omega)
    spherical = torch.stack([torch.sin((1 - t) * omega), torch.sin(t * omega)], dim=-1) / \
        torch.where(colinear, 1.0, sine).unsqueeze(-1)
    linear = torch.tensor([1 - t, t], dtype=torch.float64).expand_as(spherical)
    return torch.where(colinear.unsqueeze(-1), linear, spherical)


def products(a: torch.Tensor, b: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Σa², Σb², Σab (float64) over everything (`dim` None) or along `dim`, stacked last."""
    a, b = a.double(), b.double()
    if dim is None:
        return torch.stack([a.dot(a), b.dot(b), a.dot(b)])
    return torch.stack([(a * a).sum(dim), (b * b).sum(dim), (a * b).sum(dim)], dim=-1)


class NuSlerp(TaskVectorMethod):
    name = "nuslerp"
    title = "NuSLERP merge"
    help = "spherical interpolation of two models (or of their task vectors), per tensor, row or column"
    mergekit = "nuslerp"
    settings = NuSlerpSettings
    needs_base = False
    kinds = {"nuslerp": "NuSLERP"}

    def check(self, recipe) -> None:
        if len(recipe.models) != 2:
            raise RecipeError(recipe.source, [f"models: nuslerp interpolates two models, the recipe has "
                                              f"{len(recipe.models)}"])

    def tasks(self, recipe, inputs, tasks, warnings):  # both models read, whatever their weights
        return [self.task_for(recipe, inputs, task, None, None, settings_at(recipe, task.out.name, task.t))
                if task.kind == "average" else task for task in tasks]

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        first, second = here.weights
        total = first + second
        t = 0.5 if abs(total) < 1e-6 else second / total
        shape = task.out.shape
        has_base = inputs.base is not None
        sources = (*([inputs.base] if has_base else []), *inputs.models)
        scope = "tensor" if settings.nuslerp_flatten or len(shape) == 1 else \
            "column" if settings.nuslerp_row_wise else "row"
        found: dict[str, torch.Tensor] = {}

        def pair(blocks: list[torch.Tensor], out: torch.dtype | None = None) \
                -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            if has_base:
                base, (a, b) = deltas(blocks, out)
                return base, a, b
            return None, blocks[0].reshape(-1), blocks[1].reshape(-1)

        def sums(blocks: list[torch.Tensor], start: int) -> torch.Tensor:
            _, a, b = pair(blocks, task.out.dtype)
            if scope == "tensor":
                return products(a, b, None)
            return products(a.view(-1, *shape[1:]).flatten(1), b.view(-1, *shape[1:]).flatten(1), 0)

        def settle(total: torch.Tensor) -> None:
            found["c"] = coefficients(total, t)

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            base, a, b = pair(blocks, out.dtype)
            dtype = accumulation_dtype([a.dtype, b.dtype], out.dtype)
            if scope == "row":
                c = coefficients(products(row_view(a, shape), row_view(b, shape), -1), t).to(dtype)
                merged = row_view(a, shape).to(dtype) * c[:, :1] + row_view(b, shape).to(dtype) * c[:, 1:]
            elif scope == "column":
                c = found["c"].to(dtype)
                rows = a.numel() // c.shape[0]
                merged = a.view(rows, -1).to(dtype) * c[:, 0] + b.view(rows, -1).to(dtype) * c[:, 1]
            else:
                c0, c1 = found["c"].tolist()
                merged = torch.mul(a, c0, out=torch.empty_like(a, dtype=dtype)) if not has_base else a.mul_(c0)
                merged.add_(b, alpha=c1)
            merged = merged.reshape(-1)
            return (base.add_(merged) if base is not None else merged).view(out.shape)

        prepasses = () if scope == "row" else (Sums(f"NuSLERP angles ({scope}s)" if scope != "tensor"
                                                    else "NuSLERP angles", sums, settle),)
        return TensorTask(task.out, "nuslerp", sources, combine, task.block_elements, independent_blocks=True,
                          prepasses=prepasses, t=task.t)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        scope = "each tensor" if settings.nuslerp_flatten else "each column" if settings.nuslerp_row_wise else \
            "each row"
        what = "the task vectors δᵢ = θᵢ − θ_base (added to the base)" if recipe.base is not None else "the models"
        return [f"**NuSLERP**: spherical interpolation of {what}, at t = w₂ / (w₁ + w₂), over {scope}.", "",
                f"- angles in float64, the interpolation {PRECISION}; rounded once"]


register(NuSlerp())

