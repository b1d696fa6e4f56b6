"""DARE (Yu et al., ICML 2024): drop each entry of each task vector with probability 1 − density and
rescale the survivors by 1/density (or, as mergekit does, to the tensor's L1 norm: `rescale = "l1"`, which
`convert` writes for a mergekit config); then sum them (`dare_linear`) or elect signs as TIES does
(`dare_ties`): θ = θ_b + λ × that (methods/sparse.py).

The drop is decided by a hash of `seed`, the model's place in the recipe, the tensor's name and the
entry's position, never by a random generator's state: the same entries are dropped whatever the
block size, the number of threads or the machine.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy
import torch
from pydantic import Field

from mergecli.methods.base import register
from mergecli.methods.sparse import SparseMethod
from mergecli.methods.task_vectors import DensitySettings, DensityValue, ModelDensity

PAPER = "https://arxiv.org/abs/2311.03099"
_LOW32 = 0xFFFFFFFF


class DareSettings(DensitySettings):
    """`[dare_linear]` / `[dare_ties]`: density (the fraction kept), seed, lambda, and how the survivors are
    rescaled: "density" (× 1/density, the paper's), "l1" or true (the tensor's L1 norm kept, mergekit's), false."""

    density: DensityValue | dict[str, DensityValue] = 0.5
    seed: int = Field(default=0, ge=0, lt=2**63)
    rescale: Literal["density", "l1"] | bool = "density"


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


def draws(key: tuple[int, int], start: int, count: int) -> numpy.ndarray:
    """A uniform 32-bit draw (uint32) for each of the entries at flat positions start..start+count: a hash
    of the key and the position. The position's high 32 bits go into the key (one value for a block
    within 2³² entries; a block across that boundary is done in two parts)."""
    boundary = ((start >> 32) + 1) << 32
    if start + count > boundary:
        return numpy.concatenate([draws(key, start, boundary - start), draws(key, boundary, start + count - boundary)])
    salt = _mix_scalar((start >> 32) ^ key[1]) ^ key[0]
    x = numpy.arange(start & _LOW32, (start & _LOW32) + count, dtype=numpy.uint32)
    x ^= numpy.uint32(salt)
    return _mix32(x)


def kept(key: tuple[int, int], start: int, count: int, density: float) -> torch.Tensor:
    """Whether each of the entries at flat positions start..start+count is kept: its draw below
    density × 2³²."""
    limit = int(density * 2**32)
    if limit >= 2**32:
        return torch.ones(count, dtype=torch.bool)
    return torch.from_numpy(draws(key, start, count) < numpy.uint32(limit))


class Dare(SparseMethod):
    settings = DareSettings
    mergekit_defaults = {"density": 1.0, "rescale": "l1"}  # mergekit keeps every entry unless told a density,
    # and rescales the survivors to the tensor's L1 norm
    model_settings = ModelDensity
    normalize_default = False
    paper = f"[Yu et al., ICML 2024]({PAPER})"
    dropped = ("each entry of each task vector δᵢ = θᵢ − θ_base is dropped with probability 1 − density (by a hash of "
               "the seed and its position)")

    def sparsifier(self, recipe, inputs, task, read, here, shared):
        drops = [(stream_key(here.settings.seed, index, task.out.name), here.models[index].density)
                 for index, _, _ in read]
        if all(density >= 1.0 for _, density in drops):
            return None, ()

        def sparsify(vectors: list[torch.Tensor], start: int, remember: bool = False) -> None:
            for (key, density), vector in zip(drops, vectors):
                mask = kept(key, start, vector.numel(), density).numpy()
                numpy.multiply(vector.numpy(), mask, out=vector.numpy())  # numpy's float × bool: a third of torch's

        return sparsify, ()

    def setting_lines(self, recipe) -> list[str]:
        return [f"- seed: {recipe.settings.seed} (the drop depends on it and on each entry's position alone)"]


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
