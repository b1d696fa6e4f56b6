"""Which layers RegMean merges: every `nn.Linear` / HF `Conv1D` of a model whose weight is stored in
its checkpoint, with the orientation of that weight (`[out, in]` or `[in, out]`); and in a MoE
model, every stored expert projection and the router (stats/experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mergecli.io.safetensors import TensorInfo
from mergecli.stats.experts import (
    PROJECTIONS,
    FusedParameter,
    check_experts,
    expert_key,
    fused_parameters,
    is_experts,
    refused,
)

Orientation = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class LinearLayer:
    """A hooked layer: its module path in the loaded model and its weight's checkpoint name."""

    module: str
    weight: str
    orientation: Orientation  # "out_in": nn.Linear `[out, in]`; "in_out": HF Conv1D `[in, out]`
    in_features: int
    experts: str = ""  # an expert's projection: the fused experts module it is part of (`module` names it)
    expert: int | None = None

    @property
    def hooked(self) -> str:
        """The module whose forward pre-hook sees this layer's input."""
        return self.experts or self.module


def stored_name(name: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo], prefixes: list[str]) -> str | None:
    """The checkpoint tensor stored for the model's parameter or buffer `name`: the loaded class may
    add or drop a prefix (`bert.`, `model.`) relative to the class the checkpoint was saved from.

    Args:
        prefixes: the first components of the checkpoint's tensor names (`checkpoint_prefixes`).
    """
    for candidate in candidate_names(name, prefixes):
        info = tensors.get(candidate)
        if info is not None and tuple(info.shape) == tuple(shape):
            return info.name  # its name in the file (`stored_names` may list it under another)
    return None


def candidate_names(name: str, prefixes: list[str]) -> list[str]:
    """The names a parameter of the loaded class may have in its checkpoint: its own, without its
    leading components, or under one of the checkpoint's prefixes."""
    parts = name.split(".")
    return [name, *(".".join(parts[k:]) for k in range(1, len(parts))), *(f"{prefix}.{name}" for prefix in prefixes)]


def _conversion(model: torch.nn.Module) -> tuple[list, list]:
    """transformers' key renamings and tensor converters for loading `model`'s class."""
    from transformers.conversion_mapping import WeightConverter, WeightRenaming, get_model_conversion_mapping

    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a class transformers has no mapping for: its names are the file's
        return [], []
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


@dataclass(frozen=True)
class StoredNames:
    """How a model's parameters are found in its checkpoint."""

    tensors: dict[str, TensorInfo]  # the checkpoint's tensors, also under their loaded names
    prefixes: list[str]
    fused: dict[str, FusedParameter]  # loaded name of a fused parameter → what it is built from

    def stored(self, name: str, shape: tuple[int, ...]) -> str | None:
        return stored_name(name, shape, self.tensors, self.prefixes)

    def fused_as(self, name: str) -> FusedParameter | None:
        return next((self.fused[c] for c in candidate_names(name, self.prefixes) if c in self.fused), None)


def stored_names(model: torch.nn.Module, tensors: dict[str, TensorInfo]) -> StoredNames:
    """The checkpoint's tensors under the names transformers gives them when it loads `model`'s class:
    its own key renamings (`embed_out` → `lm_head` for GPT-NeoX, `gamma` → `weight`, ...) and tensor
    converters (MoE experts stored one by one and held fused), not a table of mergecli's.

    Raises:
        StatsError: the class fuses stored tensors in a way RegMean cannot follow.
    """
    renamings, converters = _conversion(model)
    renamed = {}
    for name in tensors:
        loaded = name
        for renaming in renamings:
            loaded = renaming.rename_source_key(loaded)[0]
        renamed[name] = loaded
    named = dict(tensors)
    for name, loaded in renamed.items():
        named.setdefault(loaded, tensors[name])
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    fused = fused_parameters(kind, renamed, converters) if converters else {}
    prefixes = checkpoint_prefixes(named)
    every = StoredNames(named, prefixes, fused)
    held: dict[str, FusedParameter] = {}
    for module_name, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            found = every.fused_as(f"{module_name}.{attr}")
            if found is None:
                continue
            if not is_experts(module):
                raise refused(kind, f"the checkpoint stores {found.stored[0]} and others that transformers fuses "
                                    f"into {found.name} when it loads this class")
            check_experts(module, kind, found, tensors)
            held[f"{module_name}.{attr}"] = found
        if is_experts(module) and not all(f"{module_name}.{attr}" in held for attr in PROJECTIONS):
            raise refused(kind, f"the checkpoint stores the experts of {module_name} fused, not one tensor per "
                                "expert and projection")
    return StoredNames(named, prefixes, held)


def checkpoint_prefixes(tensors: dict[str, TensorInfo]) -> list[str]:
    """The first components of a checkpoint's tensor names (`model`, `bert`, ...)."""
    return sorted({name.split(".", 1)[0] for name in tensors if "." in name})


def find_linear_layers(model: torch.nn.Module, tensors: dict[str, TensorInfo]) -> tuple[list[LinearLayer],
                                                                                          list[str]]:
    """Every `nn.Linear` / HF `Conv1D` of `model` whose weight is stored in the checkpoint; in a MoE
    model also every stored expert projection, and the router (the experts' sibling whose 2-D weight
    has a row per expert).

    Returns:
        The layers, and the module paths of linear layers with no weight of their own in the
        checkpoint (other than an output layer tied to the input embeddings), whose weights are
        then averaged.
    """
    from transformers.pytorch_utils import Conv1D

    names = stored_names(model, tensors)
    try:
        tied = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # a model without token embeddings
        tied = None
    routers = _routers(model)
    layers: list[LinearLayer] = []
    unmatched: list[str] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if is_experts(module):
            layers += _expert_layers(name, module, names)
            continue
        if isinstance(module, torch.nn.Linear) or name in routers:
            orientation: Orientation = "out_in"
        elif isinstance(module, Conv1D):
            orientation = "in_out"
        else:
            continue
        shape = tuple(module.weight.shape)
        weight = names.stored(f"{name}.weight", shape)
        if weight is None or weight in used:
            if module.weight is not tied:
                unmatched.append(name)
            continue
        used.add(weight)
        in_features = shape[1] if orientation == "out_in" else shape[0]
        layers.append(LinearLayer(name, weight, orientation, in_features))
    return layers, unmatched


def _routers(model: torch.nn.Module) -> set[str]:
    """The routers of a MoE model: a module beside an experts module, not an `nn.Linear` but with a
    2-D `weight` of one row per expert, which it applies to its input as a linear layer does."""
    found = set()
    for name, module in model.named_modules():
        experts = [child for child in module.children() if is_experts(child)]
        if not experts:
            continue
        count = experts[0].gate_up_proj.shape[0]
        for child_name, child in module.named_children():
            weight = child._parameters.get("weight")
            if not isinstance(child, torch.nn.Linear) and weight is not None and weight.dim() == 2 \
                    and weight.shape[0] == count:
                found.add(f"{name}.{child_name}" if name else child_name)
    return found


def _expert_layers(path: str, module: torch.nn.Module, names: StoredNames) -> list[LinearLayer]:
    """A layer per stored expert tensor: `gate_proj` and `up_proj` (or w1, w3) read the tokens routed
    to their expert, `down_proj` (w2) the gated product."""
    layers = []
    for projection in ("gate_up_proj", "down_proj"):
        fused = names.fused_as(f"{path}.{projection}")
        if fused is None:
            continue
        in_features = getattr(module, projection).shape[2]
        for stored in fused.parts.values():
            layers += [LinearLayer(expert_key(path, expert, projection), weight, "out_in", in_features, path, expert)
                       for expert, weight in enumerate(stored)]
    return layers
