"""SLERP: spherical linear interpolation of two models, tensor by tensor, at `t` in [0, 1] (0: the first
model, 1: the second), as mergekit defines it:

    θ = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,     cos Ω = ⟨a, b⟩ / (‖a‖ ‖b‖)

and linear interpolation (1 − t)·a + t·b where the normalized tensors are nearly colinear (|cos Ω| >
0.9995). A tensor's norms and dot product come from a streamed pass over its row blocks, summed in
float64 in block order (the same result whatever the number of threads), never from the tensor held.
"""

from __future__ import annotations

import math
import threading

import torch

from mergecli.errors import RecipeError
from mergecli.io.buffers import thread_buffer
from mergecli.methods.average import accumulation_dtype
from mergecli.methods.base import Prepass, TensorTask, register, settings_at, shown_value
from mergecli.methods.task_vectors import TaskVectorMethod
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying

DOT_THRESHOLD = 0.9995  # mergekit's: beyond it the angle is too small for a stable sin Ω
EPSILON = 1e-8  # a norm at or below it counts as 1 (a zero tensor is not divided by zero)


class SlerpSettings(StrictModel):
    """`[slerp]`: where between the two models, 0 (the first) to 1 (the second); a number, or varying by
    tensor (mergekit's gradients: `t = [0, 0.5, 0.3, 0.7, 1]`)."""

    t: Varying(float, ge=0.0, le=1.0, allow_inf_nan=False) = 0.5


class Angle(Prepass):
    """Σ a², Σ b², Σ ab of one tensor, from its blocks, then the interpolation's two coefficients."""

    label = "SLERP angles"

    def __init__(self, t: float):
        self.t = t
        self.parts: dict[int, torch.Tensor] = {}  # block start → its three float64 sums
        self.lock = threading.Lock()
        self.coefficients = (1.0 - t, t)
        self.linear = True

    def needed(self) -> bool:
        return True

    def fold(self, blocks: list[torch.Tensor], start: int) -> None:
        a, b = (thread_buffer(("slerp", index), block.numel(), torch.float64).copy_(block.reshape(-1))
                for index, block in enumerate(blocks))
        sums = torch.stack([a.dot(a), b.dot(b), a.dot(b)])
        with self.lock:
            self.parts[start] = sums

    def task_done(self) -> None:
        total = torch.zeros(3, dtype=torch.float64)
        for start in sorted(self.parts):  # block order: the same sum for any number of threads
            total += self.parts[start]
        self.parts = {}
        norm_a, norm_b = (math.sqrt(float(x)) for x in total[:2])
        norm_a, norm_b = (n if n > EPSILON else 1.0 for n in (norm_a, norm_b))
        cos = max(-1.0, min(1.0, float(total[2]) / (norm_a * norm_b)))
        if abs(cos) > DOT_THRESHOLD:
            return
        omega = math.acos(cos)
        sine = math.sin(omega)
        self.coefficients = (math.sin((1 - self.t) * omega) / sine, math.sin(self.t * omega) / sine)
        self.linear = False


class Slerp(TaskVectorMethod):
    name = "slerp"
    title = "SLERP merge"
    help = "spherical interpolation of two models, tensor by tensor, at t in [0, 1]"
    mergekit = "slerp"
    settings = SlerpSettings
    needs_base = False
    kinds = {"slerp": "SLERP"}

    def check(self, recipe) -> None:
        if len(recipe.models) != 2:
            raise RecipeError(recipe.source, [f"models: slerp interpolates two models, the recipe has "
                                              f"{len(recipe.models)}"])
        if recipe.base is not None:
            raise RecipeError(recipe.source, ["base: slerp interpolates its two models and reads no [base] (the "
                                              "first model is t = 0: put mergekit's base_model first)"])

    def tasks(self, recipe, inputs, tasks, warnings):
        if any(spec.weight != 1.0 for spec in recipe.models):
            warnings.append("slerp: the models' weights are not used (`[slerp] t` says where between them)")
        return [self.task_for(recipe, inputs, task, None, None, settings_at(recipe, task.out.name, task.t))
                if task.kind == "average" else task for task in tasks]

    def task_for(self, recipe, inputs, task, read, shared, here):
        angle = Angle(here.settings.t)

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            dtype = accumulation_dtype([b.dtype for b in blocks], out.dtype)
            first, second = angle.coefficients
            merged = thread_buffer("slerp", blocks[0].numel(), dtype).view(blocks[0].shape).copy_(blocks[0])
            return merged.mul_(first).add_(blocks[1], alpha=second)

        return TensorTask(task.out, "slerp", tuple(inputs.models), combine, task.block_elements,
                          independent_blocks=True, prepasses=(angle,), t=task.t)

    def describe(self, recipe) -> list[str]:
        return ["**SLERP**: spherical linear interpolation of the two models, tensor by tensor, "
                "θ = sin((1 − t)Ω)/sin Ω · θ₁ + sin(tΩ)/sin Ω · θ₂ with Ω the angle between them (linear "
                f"interpolation where |cos Ω| > {DOT_THRESHOLD}).", "",
                f"- t: {shown_value(recipe.settings.t)} (0: the first model)",
                "- norms and angles in float64, the interpolation in float32 for 16-bit inputs and output "
                "(else float64), rounded once"]


register(Slerp())
