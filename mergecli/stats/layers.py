"""Which layers RegMean merges: every `nn.Linear` / HF `Conv1D` of a model whose weight is stored in
its checkpoint, with the orientation of that weight (`[out, in]` or `[in, out]`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mergecli.errors import StatsError
from mergecli.io.safetensors import TensorInfo

Orientation = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class LinearLayer:
    """A hooked layer: its module path in the loaded model and its weight's checkpoint name."""

    module: str
    weight: str
    orientation: Orientation  # "out_in": nn.Linear `[out, in]`; "in_out": HF Conv1D `[in, out]`
    in_features: int


def stored_name(name: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo], prefixes: list[str]) -> str | None:
    """The checkpoint tensor stored for the model's parameter or buffer `name`: the loaded class may
    add or drop a prefix (`bert.`, `model.`) relative to the class the checkpoint was saved from.

    Args:
        prefixes: the first components of the checkpoint's tensor names (`checkpoint_prefixes`).
    """
    parts = name.split(".")
    candidates = [name, *(".".join(parts[k:]) for k in range(1, len(parts))),
                  *(f"{prefix}.{name}" for prefix in prefixes)]
    for candidate in candidates:
        info = tensors.get(candidate)
        if info is not None and tuple(info.shape) == tuple(shape):
            return info.name  # its name in the file (`loaded_names` may list it under another)
    return None


def loaded_names(model: torch.nn.Module, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The checkpoint's tensors, also under the names transformers gives them when it loads `model`'s
    class: its own key renamings (`embed_out` → `lm_head` for GPT-NeoX, `gamma` → `weight`, ...), not a
    table of mergecli's.

    Raises:
        StatsError: the class fuses or splits stored tensors on loading (MoE experts stored one by one
            and held fused): RegMean cannot match its layers to the file's tensors.
    """
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping

    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a class transformers has no mapping for: its names are the file's
        return tensors
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    for converter in converters:
        fused = [name for name in tensors if converter.rename_source_key(name)[1] is not None]
        if fused:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise StatsError(f"{kind}: the checkpoint stores {fused[0]} and others that transformers fuses into "
                             f"{converter.target_patterns[0].strip('.')} when it loads this class (MoE experts): "
                             "RegMean cannot merge such layers yet",
                             hint="merge this model with average or a task-vector method (mergecli merge)")
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    named = dict(tensors)
    for name, info in tensors.items():
        loaded = name
        for renaming in renamings:
            loaded = renaming.rename_source_key(loaded)[0]
        named.setdefault(loaded, info)
    return named


def checkpoint_prefixes(tensors: dict[str, TensorInfo]) -> list[str]:
    """The first components of a checkpoint's tensor names (`model`, `bert`, ...)."""
    return sorted({name.split(".", 1)[0] for name in tensors if "." in name})


def find_linear_layers(model: torch.nn.Module, tensors: dict[str, TensorInfo]) -> tuple[list[LinearLayer],
                                                                                          list[str]]:
    """Every `nn.Linear` / HF `Conv1D` of `model` whose weight is stored in the checkpoint.

    Returns:
        The layers, and the module paths of linear layers with no weight of their own in the
        checkpoint (other than an output layer tied to the input embeddings), whose weights are
        then averaged.
    """
    from transformers.pytorch_utils import Conv1D

    tensors = loaded_names(model, tensors)
    prefixes = checkpoint_prefixes(tensors)
    try:
        tied = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # a model without token embeddings
        tied = None
    layers: list[LinearLayer] = []
    unmatched: list[str] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            orientation: Orientation = "out_in"
        elif isinstance(module, Conv1D):
            orientation = "in_out"
        else:
            continue
        shape = tuple(module.weight.shape)
        weight = stored_name(f"{name}.weight", shape, tensors, prefixes)
        if weight is None or weight in used:
            if module.weight is not tied:
                unmatched.append(name)
            continue
        used.add(weight)
        in_features = shape[1] if orientation == "out_in" else shape[0]
        layers.append(LinearLayer(name, weight, orientation, in_features))
    return layers, unmatched
