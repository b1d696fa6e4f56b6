"""Isotropic merging (Marczak et al., ICML 2025), as FusionBench 0.2.33 computes it, for each 2-D tensor of
task vectors τ_i = θ_i − θ_b (K of them; m = the smaller dimension):

- `iso_c`: the sum Σ τ_i = U S Vᵀ with every singular value replaced by their mean: τ = mean(S) · U Vᵀ;
- `iso_cts`: a common subspace, the top k = m − K·round((m − ⌊f m⌋) / K) singular vectors of Σ τ_i
  (f = `common_space_fraction`), and for each model the top (m − k) / K singular vectors of its task vector
  with the common subspace projected out (τ_i − U_k U_kᵀ τ_i); the columns gathered, made orthonormal
  (polar factors), and all singular values replaced by their mean.

θ = θ_b + scaling_factor · τ; a tensor of another rank gets the mean task vector (methods/whole.py). The SVDs
are exact (the isotropic spectrum keeps every direction, so no truncation is possible for Iso-C).
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergecli.methods.average import PRECISION
from mergecli.methods.base import register, shown_value
from mergecli.methods.whole import WholeMatrixMethod, polar
from mergecli.recipe import StrictModel

PAPER = "https://arxiv.org/abs/2502.04959"


class IsoSettings(StrictModel):
    """`[iso_c]`: the scale of the merged task vector (FusionBench's default, 1)."""

    scaling_factor: float = Field(default=1.0, allow_inf_nan=False)


class IsoCtsSettings(IsoSettings):
    """`[iso_cts]`: scaling_factor, and the share of the spectrum given to the common subspace."""

    common_space_fraction: float = Field(default=0.8, ge=0.0, le=1.0)


def summed(vectors) -> torch.Tensor:
    total = None
    for vector in vectors():
        total = vector if total is None else total.add_(vector)
    return total


def iso_c_merge(vectors, count: int) -> torch.Tensor:
    """Iso-C's task vector of one matrix."""
    u, s, vh = torch.linalg.svd(summed(vectors), full_matrices=False)
    return (u * s.mean()) @ vh


def iso_cts_merge(fraction: float):
    def merge(vectors, count: int) -> torch.Tensor:
        total = summed(vectors)
        m = min(total.shape)
        common = m - round((m - int(m * fraction)) / count) * count
        each = int((m - common) / count)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        del total
        common_u, common_s, common_v = u[:, :common].clone(), s[:common].clone(), vh[:common].clone()
        del u, s, vh
        parts_u, parts_s, parts_v = [], [], []
        for vector in vectors():
            vector -= common_u @ (common_u.T @ vector)
            u, s, vh = torch.linalg.svd(vector, full_matrices=False)
            del vector
            parts_u.append(u[:, :each].clone())
            parts_s.append(s[:each].clone())
            parts_v.append(vh[:each].clone())
            del u, s, vh
        spectrum = torch.cat([*parts_s, common_s])
        u = polar(torch.cat([*parts_u, common_u], dim=1))
        v = polar(torch.cat([*parts_v, common_v], dim=0))
        return (u * spectrum.mean()) @ v

    return merge


class IsoC(WholeMatrixMethod):
    name = "iso_c"
    title = "Iso-C merge"
    help = "the summed task vectors with a flat (isotropic) singular spectrum (FusionBench)"
    settings = IsoSettings
    flops = 2.0
    kinds = {"iso_c": "Iso-C"}

    def scale(self, settings) -> float:
        return settings.scaling_factor

    def matrix_merge(self, settings):
        return iso_c_merge

    def describe(self, recipe) -> list[str]:
        return [f"**Iso-C** ([Marczak et al., ICML 2025]({PAPER}), as FusionBench 0.2.33 computes it): each 2-D "
                "tensor's summed task vector with all its singular values set to their mean; other tensors get the "
                "mean task vector. θ = θ_base + scaling_factor × that.", "",
                f"- scaling_factor: {shown_value(recipe.settings.scaling_factor)}",
                f"- SVDs {PRECISION}, one task vector in memory at a time"]


class IsoCts(IsoC):
    name = "iso_cts"
    title = "Iso-CTS merge"
    help = "Iso-C with a common subspace plus each model's own directions, spectrum flattened (FusionBench)"
    settings = IsoCtsSettings
    flops = 5.0
    kinds = {"iso_cts": "Iso-CTS"}

    def matrix_merge(self, settings):
        return iso_cts_merge(settings.common_space_fraction)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        return [f"**Iso-CTS** ([Marczak et al., ICML 2025]({PAPER}), as FusionBench 0.2.33 computes it): for each 2-D "
                "tensor, the top singular vectors of the summed task vector (the common subspace) and each model's "
                "top singular vectors outside it, made orthonormal together, with a flat spectrum; other tensors get "
                "the mean task vector. θ = θ_base + scaling_factor × that.", "",
                f"- scaling_factor: {shown_value(settings.scaling_factor)}, common_space_fraction: "
                f"{shown_value(settings.common_space_fraction)}",
                f"- SVDs {PRECISION}, one task vector in memory at a time"]


register(IsoC())
register(IsoCts())
