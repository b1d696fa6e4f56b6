"""TSV-M: task singular vectors, merged (Gargiulo et al., CVPR 2025), as FusionBench 0.2.33 computes it. For
each 2-D tensor, of K task vectors τ_i = θ_i − θ_b (m = min of its dimensions, r = ⌊m / K⌋):

    τ_i = U_i S_i V_iᵀ                     (each task vector's SVD, kept to its top r components)
    U = [U_1,r … U_K,r],  S = [S_1,r … S_K,r],  V = [V_1,r … V_K,r]
    τ = (U_U V_Uᵀ) diag(S) (U_V V_Vᵀ)ᵀ      (U and V made orthonormal: the polar factors of their SVDs)

θ = θ_b + alpha · τ; a tensor of another rank gets the mean of the task vectors (methods/whole.py). Only the
top r components of each SVD are kept; the exact SVD is taken (a randomized one would change the chosen
components where singular values are close).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergecli.methods.average import PRECISION
from mergecli.methods.base import register, shown_value
from mergecli.methods.whole import WholeMatrixMethod, polar
from mergecli.recipe import StrictModel

PAPER = "https://arxiv.org/abs/2412.00081"


class TsvSettings(StrictModel):
    """`[tsv]`: alpha, the scale of the merged task vector (FusionBench's default, 1)."""

    alpha: float = Field(default=1.0, allow_inf_nan=False)


def tsv_merge(vectors, count: int) -> torch.Tensor:
    """The TSV-M task vector of one matrix, from its task vectors (read one at a time)."""
    parts_u, parts_s, parts_v = [], [], []
    for vector in vectors():
        u, s, vh = torch.linalg.svd(vector, full_matrices=False)
        del vector
        r = s.shape[0] // count
        parts_u.append(u[:, :r].clone())
        parts_s.append(s[:r].clone())
        parts_v.append(vh[:r].clone())
        del u, s, vh
    u = torch.cat(parts_u, dim=1)
    del parts_u
    u = polar(u)
    v = torch.cat(parts_v, dim=0)
    del parts_v
    v = polar(v)
    return (u * torch.cat(parts_s)) @ v


class Tsv(WholeMatrixMethod):
    name = "tsv"
    title = "TSV-M merge"
    help = "task singular vectors: each task vector's top singular components, decorrelated, summed (FusionBench)"
    settings = TsvSettings
    flops = 4.0  # the K SVDs, at most a tensor each, and the two polar factors
    kinds = {"tsv": "TSV-M"}

    def scale(self, settings) -> float:
        return settings.alpha

    def matrix_merge(self, settings):
        return tsv_merge

    def describe(self, recipe) -> list[str]:
        return [f"**TSV-M** ([Gargiulo et al., CVPR 2025]({PAPER}), as FusionBench 0.2.33 computes it): each 2-D "
                "tensor's task vectors are reduced to their top 1/K singular components, whose singular vectors are "
                "made orthonormal together (polar factors) and recombined with their singular values; other "
                "tensors get the mean task vector. θ = θ_base + alpha × that.", "",
                f"- alpha: {shown_value(recipe.settings.alpha)}",
                f"- SVDs {PRECISION}, one task vector in memory at a time"]


register(Tsv())
