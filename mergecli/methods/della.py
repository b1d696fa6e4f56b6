"""DELLA (Deep et al. 2024), as mergekit 0.1.5 defines it (`della_magprune`): each entry of each task vector
δ_i = θ_i − θ_b is kept with a probability that grows with its magnitude's rank r (1..n) in its row

    p = (density − epsilon) + 2 · epsilon · (r − 1) / (n − 1)

(a row: the vector along dimension 1, for a 2-D tensor its rows; a 1-D tensor is one row), the survivors
rescaled so that the tensor's task vector keeps its L1 norm (`rescale`, on by default; false: none), then
merged as TIES does (`della`: signs elected, the agreeing entries averaged by weight) or summed
(`della_linear`): θ = θ_b + λ × that (methods/sparse.py). A model whose density is 1 is kept whole.

Ranks are exact, equal magnitudes ordered by position (mergekit's sort leaves their order to chance); the
draw for each entry is a hash of `seed`, the model's place and the entry's position (methods/dare.py), so
the output is the same for any block size, thread count or machine.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import numpy
import torch
from pydantic import Field

from mergecli.methods.base import register, shown_value
from mergecli.methods.dare import draws, stream_key
from mergecli.methods.sparse import SparseMethod, refuse
from mergecli.methods.task_vectors import DensitySettings, DensityValue
from mergecli.recipe import StrictModel
from mergecli.recipe.varying import Varying, varies

PAPER = "https://arxiv.org/abs/2406.11617"
MASK_BUDGET = 192 * 2**20  # bytes of packed keep masks kept from the L1 pass for the merge
EpsilonValue = Varying(float, ge=0.0, allow_inf_nan=False)


class DellaSettings(DensitySettings):
    """`[della]` / `[della_linear]`: density (the mean share kept), epsilon (how far the keep probability moves
    with the rank), seed, lambda, and rescale (keep each tensor's L1 norm)."""

    density: DensityValue | dict[str, DensityValue] = 1.0
    epsilon: EpsilonValue | dict[str, EpsilonValue] = 0.15
    seed: int = Field(default=0, ge=0, lt=2**63)
    rescale: bool = True


class ModelDella(StrictModel):
    """A [[models]] entry's own density and epsilon."""

    density: DensityValue | None = None
    epsilon: EpsilonValue | None = None


def row_ranks(magnitudes: torch.Tensor) -> numpy.ndarray:
    """The 0-based rank r − 1 of each entry of each row of `magnitudes` (rows × n, float32, ≥ 0) among its
    row's, equal ones ordered by position (int32). Two stable radix passes, the low 16 bits of each
    magnitude then the high 16 (numpy sorts 16-bit keys by radix: several times faster than a comparison
    sort of the float32 values)."""
    rows, n = magnitudes.shape
    bits = magnitudes.contiguous().view(torch.int32).numpy()
    order = numpy.argsort((bits & 0xFFFF).astype(numpy.uint16), axis=1, kind="stable")
    high = numpy.take_along_axis((bits >> 16).astype(numpy.uint16), order, axis=1)
    order = numpy.take_along_axis(order, numpy.argsort(high, axis=1, kind="stable"), axis=1)
    ranks = numpy.empty((rows, n), dtype=numpy.int32)
    numpy.put_along_axis(ranks, order, numpy.arange(n, dtype=numpy.int32)[None, :], axis=1)
    return ranks


@functools.lru_cache(maxsize=64)
def limits(n: int, density: float, epsilon: float) -> numpy.ndarray:
    """For each rank r − 1 = 0..n − 1, the largest 32-bit draw that keeps the entry: draw < p · 2³² with
    p = (density − ε) + 2ε · (r − 1) / (n − 1) in float64 (strictly between 0 and 1: check_epsilon)."""
    ranks = numpy.arange(n, dtype=numpy.float64)
    probability = (density - epsilon) + 2 * epsilon * (ranks / (n - 1) if n > 1 else ranks * 0)
    return (numpy.ceil(probability * 2.0**32) - 1).astype(numpy.uint32)


def ranks_in_rows(vector: torch.Tensor, shape: tuple[int, ...]) -> numpy.ndarray:
    """Each entry's 0-based rank (flat, in the block's order) by magnitude in its row: the vector along
    dimension 1 (a 2-D tensor's rows; a 1-D tensor is one row)."""
    if len(shape) <= 2:
        return row_ranks(vector.abs().float().view(-1, shape[-1])).reshape(-1)
    rest = shape[2:].numel()
    along = vector.abs().float().view(-1, shape[1], rest).transpose(1, 2).reshape(-1, shape[1])
    return row_ranks(along).reshape(-1, rest, shape[1]).transpose(0, 2, 1).reshape(-1)


class KeptMasks:
    """The keep masks the L1 pass drew, packed 8 to a byte, for the merge to take instead of ranking every
    row again, up to a budget (past it, the merge ranks the rows again: the same masks, recomputed)."""

    def __init__(self, budget: int = MASK_BUDGET):
        self.left = budget
        self.masks: dict[tuple, numpy.ndarray] = {}
        self.lock = threading.Lock()

    def put(self, key: tuple, keep: numpy.ndarray) -> None:
        packed = numpy.packbits(keep)
        with self.lock:
            if packed.nbytes <= self.left:
                self.left -= packed.nbytes
                self.masks[key] = packed

    def take(self, key: tuple, count: int) -> numpy.ndarray | None:
        with self.lock:
            packed = self.masks.pop(key, None)
            if packed is not None:
                self.left += packed.nbytes
        return None if packed is None else numpy.unpackbits(packed, count=count).view(numpy.bool_)


class Della(SparseMethod):
    settings = DellaSettings
    model_settings = ModelDella
    paper = f"[Deep et al. 2024]({PAPER})"
    dropped = ("each entry of each task vector δᵢ = θᵢ − θ_base is kept with probability density − ε + 2ε · rank / "
               "(n − 1), rank its magnitude's among its row's")

    def check(self, recipe) -> None:
        super().check(recipe)
        for spec in recipe.models:
            own = spec.settings
            density = own.density if own is not None and own.density is not None else recipe.settings.density
            epsilon = own.epsilon if own is not None and own.epsilon is not None else recipe.settings.epsilon
            density = density.get(spec.name) if isinstance(density, dict) else density
            epsilon = epsilon.get(spec.name) if isinstance(epsilon, dict) else epsilon
            if isinstance(density, float) and isinstance(epsilon, float) and not varies(density):
                check_epsilon(recipe, density, epsilon, spec.name)

    def sparsifier(self, recipe, inputs, task, read, here, shared):
        shape = task.out.shape
        drops = []
        for index, _, _ in read:
            density, epsilon = here.models[index].density, here.models[index].epsilon
            if density < 1.0:
                check_epsilon(recipe, density, epsilon, recipe.models[index].name)
            drops.append((stream_key(here.settings.seed, index, task.out.name), density, epsilon))
        if all(density >= 1.0 for _, density, _ in drops):
            return None, ()

        row = shape[1] if len(shape) > 1 else shape[0]
        masks = shared

        def sparsify(vectors: list[torch.Tensor], start: int, remember: bool = False) -> None:
            for i, ((key, density, epsilon), vector) in enumerate(zip(drops, vectors)):
                if density >= 1.0:
                    continue
                keep = None if remember else masks.take((task.out.name, i, start), vector.numel())
                if keep is None:
                    drawn = draws(key, start, vector.numel())
                    keep = drawn <= limits(row, density, epsilon)[ranks_in_rows(vector, shape)]
                    if remember:
                        masks.put((task.out.name, i, start), keep)
                numpy.multiply(vector.numpy(), keep, out=vector.numpy())

        return sparsify, ()

    def shared(self, recipe, floating):
        return KeptMasks()

    def made(self, task, sources, combine, prepasses):
        made = super().made(task, sources, combine, prepasses)  # a 1-D tensor is one row: ranked in one block
        return dataclasses.replace(made, block_elements=task.out.numel) if len(task.out.shape) == 1 else made

    def setting_lines(self, recipe) -> list[str]:
        settings = recipe.settings
        epsilon = settings.epsilon
        shown = ", ".join(f"{k} {shown_value(v)}" for k, v in epsilon.items()) if isinstance(epsilon, dict) else \
            shown_value(epsilon)
        return [f"- epsilon: {shown}",
                f"- seed: {settings.seed} (each entry's draw depends on it and its position alone)"]


def check_epsilon(recipe, density: float, epsilon: float, model: str) -> None:
    """density ± epsilon must be a probability strictly between 0 and 1 (as mergekit requires).

    Raises:
        RecipeError: it is not.
    """
    if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
        raise refuse(recipe, "epsilon", f"{epsilon:g} with density {density:g} ({model}) gives keep probabilities "
                                        f"from {density - epsilon:g} to {density + epsilon:g}: density ± epsilon must "
                                        "lie strictly between 0 and 1")


class DellaTies(Della):
    name = "della"
    title = "DELLA merge"
    help = "task vectors' entries dropped with a probability that falls with their magnitude's rank, then TIES' signs"
    mergekit = "della"
    normalize_default = True
    elect_signs = True
    kinds = {"della": "DELLA"}


class DellaLinear(Della):
    name = "della_linear"
    title = "DELLA linear merge"
    help = "task vectors' entries dropped with a probability that falls with their magnitude's rank, then summed"
    mergekit = "della_linear"
    normalize_default = False
    kinds = {"della_linear": "DELLA (linear)"}


register(DellaTies())
register(DellaLinear())
