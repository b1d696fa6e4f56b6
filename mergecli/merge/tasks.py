"""The default tasks every method starts from: each floating tensor of the reference model is
averaged; head, excluded and integer tensors are copied from the reference.
"""

from __future__ import annotations

import re
import threading

import torch

from mergecli.errors import RecipeError, shown
from mergecli.io.blocks import positions
from mergecli.io.dequantize import QuantizedInfo
from mergecli.io.fp8 import DEFAULT_TILE, Fp8Output, fits, quantizable
from mergecli.io.quantized import quantization_config
from mergecli.io.safetensors import TensorInfo, TensorSpec
from mergecli.methods import base
from mergecli.methods.average import weighted_combine
from mergecli.methods.base import Combine, Inputs, TensorTask, copy_first
from mergecli.recipe import Recipe

OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fp8_output(recipe: Recipe, reference) -> Fp8Output | None:
    """The tensors written fp8 block-scaled: with dtype "auto", those the reference stores so (with its
    tile and quantization_config); with "float8_e4m3fn", every linear weight of the blocks that is whole
    tiles (the reference's tile, else 128 × 128). None: no fp8 output."""
    blocked = {name: info for name, info in reference.tensors.items()
               if isinstance(info, QuantizedInfo) and info.block is not None}
    tile = next(iter(blocked.values())).block if blocked else DEFAULT_TILE
    if recipe.dtype == "auto" and blocked:
        names = {name for name, info in blocked.items() if fits(info.shape, tile)}
    elif recipe.dtype == "float8_e4m3fn":
        names = {name for name, info in reference.tensors.items()
                 if info.dtype.is_floating_point and quantizable(name, info.shape, tile)}
    else:
        return None
    settings = quantization_config(reference.config()) if blocked else None
    return Fp8Output(tile, frozenset(names), dict(settings or {}))


def output_dtype(recipe: Recipe, info: TensorInfo, fp8: Fp8Output | None = None) -> torch.dtype:
    """Floating tensors get the recipe's dtype ("auto": the reference's; bfloat16 for one stored quantized);
    a tensor written fp8 is merged in float32 (and requantized as it is written); others keep theirs."""
    if not info.dtype.is_floating_point:
        return info.dtype
    if fp8 is not None and info.name in fp8.names:
        return torch.float32
    if recipe.dtype == "auto" and isinstance(info, QuantizedInfo):
        return info.plain_dtype or torch.bfloat16
    if recipe.dtype == "float8_e4m3fn":
        return torch.bfloat16
    return info.dtype if recipe.dtype == "auto" else OUTPUT_DTYPES[recipe.dtype]


def _integer_combine(name: str, warnings: list[str]) -> Combine:
    noted = threading.Lock()  # blocks of one tensor may be checked on several threads at once

    def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        if any(not torch.equal(blocks[0], b) for b in blocks[1:]):
            message = f"{shown(name)}: integer tensor differs between models; copied from the reference model"
            with noted:
                if message not in warnings:
                    warnings.append(message)
        return blocks[0]

    return combine


def default_tasks(recipe: Recipe, inputs: Inputs, warnings: list[str], dropped: set[str] = frozenset(), *,
                  normalize: bool = True, places: dict[str, float] | None = None) -> list[TensorTask]:
    """One task per tensor of the reference (but the `dropped` ones): averaged (divided by the sum of
    the weights when `normalize`: the weights of that tensor, where they vary by tensor), or copied
    from the reference model. Each task knows its position among the layers (`t`: from `places`, else
    from the reference's tensor names).

    Raises:
        RecipeError: weights that vary by tensor sum to 0 for one, and `normalize` would divide by it.
    """
    head = [re.compile(p) for p in recipe.head_patterns]
    exclude = [re.compile(p) for p in recipe.exclude]
    reference = inputs.reference
    places = places if places is not None else positions(reference.tensors)
    combines: dict[tuple, Combine] = {}  # one combine per set of weights: all tensors but for gradients

    def average(name: str, t: float) -> tuple[tuple, Combine]:
        weights, divisor = recipe.average_weights(normalize=normalize, tensor=name, t=t)
        if normalize and divisor == 0.0:
            raise RecipeError(recipe.source, [f"models: the weights of {shown(name)} sum to 0, so they cannot be "
                                              "normalized (set normalize = false?)"])
        key = (tuple(weights), divisor)
        if key not in combines:
            combines[key] = weighted_combine([w for w in weights if w != 0], divisor=divisor)
        read = tuple(model for model, weight in zip(inputs.models, weights) if weight != 0)  # 0 adds nothing
        return read, combines[key]

    block = base.BLOCK_ELEMENTS  # read at call time: tests stream in tiny blocks
    fp8 = fp8_output(recipe, reference)
    tasks = []
    for name, info in reference.tensors.items():
        if name in dropped:
            continue
        out = TensorSpec(name, output_dtype(recipe, info, fp8), info.shape)
        t = places[name]
        if any(p.fullmatch(name) for p in exclude):
            tasks.append(TensorTask(out, "exclude", (reference,), copy_first, block, independent_blocks=True, t=t))
        elif recipe.backbone_only and any(p.fullmatch(name) for p in head):
            tasks.append(TensorTask(out, "head", (reference,), copy_first, block, independent_blocks=True, t=t))
        elif not info.dtype.is_floating_point:
            tasks.append(TensorTask(out, "integer", (reference, *inputs.models), _integer_combine(name, warnings),
                                    block, independent_blocks=True, t=t))
        else:
            read, combine = average(name, t)
            tasks.append(TensorTask(out, "average", read, combine, block, independent_blocks=True, t=t))
    for pattern in exclude:
        if not any(pattern.fullmatch(n) for n in reference.tensors):
            warnings.append(f"exclude pattern {pattern.pattern!r} matches no tensor")
    if recipe.backbone_only and not any(t.kind == "head" for t in tasks):
        warnings.append("backbone_only: no tensor matches the head patterns "
                        "(tied embeddings store no lm_head); everything was averaged")
    return tasks
