"""DARE (Yu et al., ICML 2024): drop each entry of each task vector with probability 1 − density and
rescale the survivors by 1/density; then sum them (`dare_linear`) or elect signs as TIES does
(`dare_ties`): θ = θ_b + λ × that.

The drop is decided by a hash of `seed`, the model's place in the recipe, the tensor's name and the
entry's position, never by a random generator's state: the same entries are dropped whatever the
block size, the number of threads or the machine.
"""

from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from mergecli.methods.base import TensorTask, register
from mergecli.methods.task_vectors import DensitySettings, ModelDensity, TaskVectorMethod, deltas, densities
from mergecli.methods.task_vectors import elect_and_merge as elect

PAPER = "https://arxiv.org/abs/2311.03099"
_LOW32 = 0xFFFFFFFF


class DareSettings(DensitySettings):
    """`[dare_linear]` / `[dare_ties]`: density (the fraction kept), seed and lambda."""

    density: float | dict[str, float] = 0.5
    seed: int = Field(default=0, ge=0, lt=2**63)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x · constant) mod 2³² for x in [0, 2³²), in int64 without overflow (16 bits at a time)."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _LOW32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_key(seed: int, model: int, tensor: str) -> tuple[int, int]:
    """Two 32-bit keys for one model's entries of one tensor."""
    digest = hashlib.sha256(f"mergecli-dare|{seed}|{model}|{tensor}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def kept(key: tuple[int, int], start: int, count: int, density: float) -> torch.Tensor:
    """Whether each of the entries at flat positions start..start+count is kept: a 32-bit hash of the
    key and the position, below density × 2³²."""
    position = torch.arange(start, start + count, dtype=torch.int64)
    x = _mix32((position & _LOW32) ^ key[0])
    x = _mix32(x ^ ((position >> 32) & _LOW32) ^ key[1])
    return x < int(density * 2**32)


class Dare(TaskVectorMethod):
    settings = DareSettings
    model_settings = ModelDensity
    normalize_default = False
    elect_signs = False

    def task_for(self, recipe, inputs, task, read, shared):
        settings = recipe.settings
        model_density = densities(recipe)
        drops = [(stream_key(settings.seed, index, task.out.name), model_density[index]) for index, _, _ in read]
        weights = [weight for _, _, weight in read]
        normalize = self.normalize(recipe)
        elect_signs = self.elect_signs
        scale = settings.lambda_ * (1.0 if normalize and elect_signs else 1.0 / self.divisor(recipe))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks)
            survivors = []
            for (key, density), vector, weight in zip(drops, vectors, weights):
                keep = kept(key, start, vector.numel(), density).view(vector.shape)
                survivors.append(torch.where(keep, vector, 0).mul_(weight / density))
            if elect_signs:
                merged = elect(survivors, weights, normalize=normalize)
            else:
                merged = torch.stack(survivors).sum(0) if len(survivors) > 1 else survivors[0]
            return base.add_(merged, alpha=scale)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, self.name, sources, combine, task.block_elements, independent_blocks=True,
                          positional=True)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        shown = ", ".join(f"{spec.name} {density:g}" for spec, density in zip(recipe.models, densities(recipe)))
        then = ("a sign is elected per entry as in TIES and the agreeing entries are "
                + ("averaged" if self.normalize(recipe) else "summed")) if self.elect_signs else \
            "the weighted task vectors are " + ("averaged" if self.normalize(recipe) else "summed")
        return [f"**{self.title}** ([Yu et al., ICML 2024]({PAPER})): each entry of each task vector "
                f"δᵢ = θᵢ − θ_base is dropped with probability 1 − density and the survivors rescaled by 1/density; "
                f"{then}; θ = θ_base + λ × that.", "", f"- density (fraction kept): {shown}",
                f"- seed: {settings.seed} (the drop depends on it and on each entry's position alone)",
                f"- λ (`lambda`): {settings.lambda_:g}",
                "- computed in float32 (float64 for float64 inputs), rounded once"]


class DareLinear(Dare):
    name = "dare_linear"
    title = "DARE linear merge"
    kinds = {"dare_linear": "DARE (linear)"}


class DareTies(Dare):
    name = "dare_ties"
    title = "DARE TIES merge"
    kinds = {"dare_ties": "DARE TIES"}
    elect_signs = True


register(DareLinear())
register(DareTies())
