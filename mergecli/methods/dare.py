"""DARE (Yu et al., ICML 2024): drop each entry of each task vector with probability 1 − density and
rescale the survivors by 1/density; then sum them (`dare_linear`) or elect signs as TIES does
(`dare_ties`): θ = θ_b + λ × that.

The drop is decided by a hash of `seed`, the model's place in the recipe, the tensor's name and the
entry's position, never by a random generator's state: the same entries are dropped whatever the
block size, the number of threads or the machine.
"""

from __future__ import annotations

import hashlib

import numpy
import torch
from pydantic import Field

from mergecli.methods.base import TensorTask, register, shown_value
from mergecli.methods.task_vectors import (
    DensitySettings,
    DensityValue,
    ModelDensity,
    TaskVectorMethod,
    add_elected,
    deltas,
    shown_density,
)

PAPER = "https://arxiv.org/abs/2311.03099"
_LOW32 = 0xFFFFFFFF


class DareSettings(DensitySettings):
    """`[dare_linear]` / `[dare_ties]`: density (the fraction kept), seed and lambda."""

    density: DensityValue | dict[str, DensityValue] = 0.5
    seed: int = Field(default=0, ge=0, lt=2**63)


_MULTIPLIER = 0x45D9F3B


def _mix32(x: numpy.ndarray) -> numpy.ndarray:
    """A 32-bit integer hash (xorshift-multiply, twice), in place on uint32 values (numpy's uint32
    products wrap modulo 2³²): every input bit reaches every output bit. numpy, not torch: torch has
    no uint32 arithmetic, and int64 costs it four times as much here."""
    multiplier = numpy.uint32(_MULTIPLIER)
    for _ in range(2):
        x ^= x >> 16
        x *= multiplier
    x ^= x >> 16
    return x


def _mix_scalar(value: int) -> int:
    """`_mix32` of one number."""
    for _ in range(2):
        value ^= value >> 16
        value = (value * _MULTIPLIER) & _LOW32
    return value ^ (value >> 16)


def stream_key(seed: int, model: int, tensor: str) -> tuple[int, int]:
    """Two 32-bit keys for one model's entries of one tensor."""
    digest = hashlib.sha256(f"mergecli-dare|{seed}|{model}|{tensor}".encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def kept(key: tuple[int, int], start: int, count: int, density: float) -> torch.Tensor:
    """Whether each of the entries at flat positions start..start+count is kept: a 32-bit hash of the
    key and the position, below density × 2³². The position's high 32 bits go into the key (one value
    for a block within 2³² entries; a block across that boundary is done in two parts)."""
    boundary = ((start >> 32) + 1) << 32
    if start + count > boundary:
        return torch.cat([kept(key, start, boundary - start, density),
                          kept(key, boundary, start + count - boundary, density)])
    salt = _mix_scalar((start >> 32) ^ key[1]) ^ key[0]
    limit = int(density * 2**32)
    if limit >= 2**32:
        return torch.ones(count, dtype=torch.bool)
    x = numpy.arange(start & _LOW32, (start & _LOW32) + count, dtype=numpy.uint32)
    x ^= numpy.uint32(salt)
    return torch.from_numpy(_mix32(x) < numpy.uint32(limit))


class Dare(TaskVectorMethod):
    settings = DareSettings
    mergekit_defaults = {"density": 1.0}  # mergekit keeps every entry unless told a density
    model_settings = ModelDensity
    normalize_default = False
    elect_signs = False

    def task_for(self, recipe, inputs, task, read, shared, here):
        settings = here.settings
        model_density = [model.density for model in here.models]
        drops = [(stream_key(settings.seed, index, task.out.name), model_density[index]) for index, _, _ in read]
        weights = [weight for _, _, weight in read]
        normalize = self.normalize(recipe)
        elect_signs = self.elect_signs
        scale = settings.lambda_ * (1.0 if normalize and elect_signs else 1.0 / self.divisor(recipe, here))

        def combine(blocks: list[torch.Tensor], out: torch.Tensor, start: int) -> torch.Tensor:
            base, vectors = deltas(blocks)
            survivors = []
            for (key, density), vector, weight in zip(drops, vectors, weights):
                mask = kept(key, start, vector.numel(), density).numpy()
                numpy.multiply(vector.numpy(), mask, out=vector.numpy())  # numpy's float × bool: a third of torch's
                survivors.append(vector.mul_(weight / density))
            if elect_signs:
                return add_elected(base, survivors, weights, normalize=normalize, scale=scale).view(out.shape)
            merged = survivors[0]
            for survivor in survivors[1:]:
                merged.add_(survivor)
            return base.add_(merged, alpha=scale).view(out.shape)

        sources = (inputs.base, *(checkpoint for _, checkpoint, _ in read))
        return TensorTask(task.out, self.name, sources, combine, task.block_elements, independent_blocks=True,
                          positional=True, t=task.t)

    def describe(self, recipe) -> list[str]:
        settings = recipe.settings
        shown = shown_density(recipe)
        then = ("a sign is elected per entry as in TIES and the agreeing entries are "
                + ("averaged" if self.normalize(recipe) else "summed")) if self.elect_signs else \
            "the weighted task vectors are " + ("averaged" if self.normalize(recipe) else "summed")
        return [f"**{self.title}** ([Yu et al., ICML 2024]({PAPER})): each entry of each task vector "
                f"δᵢ = θᵢ − θ_base is dropped with probability 1 − density and the survivors rescaled by 1/density; "
                f"{then}; θ = θ_base + λ × that.", "", f"- density (fraction kept): {shown}",
                f"- seed: {settings.seed} (the drop depends on it and on each entry's position alone)",
                f"- λ (`lambda`): {shown_value(settings.lambda_)}",
                "- computed in float32 (float64 for float64 inputs), rounded once"]


class DareLinear(Dare):
    name = "dare_linear"
    title = "DARE linear merge"
    help = "task vectors' entries dropped at random (kept with probability density, rescaled), then summed"
    mergekit = "dare_linear"
    kinds = {"dare_linear": "DARE (linear)"}


class DareTies(Dare):
    name = "dare_ties"
    title = "DARE TIES merge"
    help = "task vectors' entries dropped at random, then a sign elected per entry as TIES does"
    mergekit = "dare_ties"
    kinds = {"dare_ties": "DARE TIES"}
    elect_signs = True


register(DareLinear())
register(DareTies())
