"""WUDI: "whoever started the interference should end it" (Cheng et al., ICML 2025). FusionBench 0.2.33 finds,
for each 2-D tensor with task vectors τ_i = θ_i − θ_b (rows: outputs), the merged task vector τ that
minimizes

    L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖² / ‖τ_i‖²

by 300-400 steps of Adam from Σ τ_i. L is quadratic in τ: its gradient vanishes where τ G = B, with

    G = Σ_i τ_iᵀ τ_i / ‖τ_i‖²   (in × in),      B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖²

so mergecli solves that system, as RegMean solves its own (methods/regmean/math.py: Cholesky on the
Jacobi-scaled system in float64, a small ridge where G is singular, which picks the minimizer of least
norm): the exact minimizer, so L is never above what the Adam loop reaches. θ = θ_b + τ; a tensor of
another rank gets the mean task vector (methods/whole.py). G and B are summed one task vector at a time.
"""

from __future__ import annotations

import torch

from mergecli.methods.base import register
from mergecli.methods.regmean.math import Factor
from mergecli.methods.whole import WholeMatrixMethod
from mergecli.recipe import StrictModel

PAPER = "https://arxiv.org/abs/2503.08099"
ROWS = 4096  # rows of a task vector taken to float64 at a time
COLUMNS = 1024  # right-hand sides solved at a time


class WudiSettings(StrictModel):
    """`[wudi]`: no settings (the minimizer is exact: FusionBench's `iter_num` has no use here)."""


def wudi_merge(vectors, count: int) -> torch.Tensor:
    """WUDI's task vector of one matrix: the exact minimizer of L."""
    grams = moments = None
    for vector in vectors():
        energy = float(vector.double().square().sum())
        if energy == 0.0:
            continue
        own = torch.zeros(vector.shape[1], vector.shape[1], dtype=torch.float64, device=vector.device)
        for start in range(0, vector.shape[0], ROWS):
            rows = vector[start:start + ROWS].double()
            own.addmm_(rows.T, rows)
        own /= energy
        grams = own.clone() if grams is None else grams.add_(own)
        if moments is None:
            moments = torch.zeros_like(vector)
        for start in range(0, vector.shape[0], ROWS):
            moments[start:start + ROWS] += (vector[start:start + ROWS].double() @ own).to(vector.dtype)
        del own
    if grams is None:
        return torch.zeros_like(vector)
    factor = Factor(grams)
    merged = torch.empty_like(moments)
    for start in range(0, moments.shape[0], COLUMNS):
        rhs = moments[start:start + COLUMNS].T.double()
        merged[start:start + COLUMNS] = factor.solve(rhs, torch.zeros_like(rhs)).T.to(merged.dtype)
    return merged


class Wudi(WholeMatrixMethod):
    name = "wudi"
    title = "WUDI merge"
    help = "the task vector that least disturbs each model's own directions, solved exactly (FusionBench's WUDI)"
    settings = WudiSettings
    flops = 3.0
    kinds = {"wudi": "WUDI"}

    def matrix_merge(self, settings):
        return wudi_merge

    def describe(self, recipe) -> list[str]:
        return [f"**WUDI** ([Cheng et al., ICML 2025]({PAPER})): each 2-D tensor's merged task vector τ minimizes "
                "Σᵢ ‖(τ − τᵢ) τᵢᵀ‖² / ‖τᵢ‖², solved exactly (τ G = B, as RegMean solves) where FusionBench takes "
                "Adam steps; other tensors get the mean task vector. θ = θ_base + τ.", "",
                "- Gram matrices and the solve in float64, one task vector in memory at a time"]


register(Wudi())
