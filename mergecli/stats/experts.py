"""MoE experts as RegMean sees them. transformers holds a MoE layer's experts fused in two 3-D
parameters, `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`, where checkpoints store one
tensor per expert and projection (`experts.3.w1.weight`, `experts.3.gate_proj.weight`, ...).

- `fused_parameters`: which file tensors make each fused parameter, found with transformers' own
  conversion mapping (its `WeightConverter`s), and `load_fused` builds the parameter with the
  converter's own operations.
- every stored expert tensor is then a linear layer of its own (stats/layers.py): `gate_proj` /
  `up_proj` read the tokens routed to their expert, `down_proj` the gated product `act(gate) * up`.
- `ExpertsHook`: a forward pre-hook on the experts module that adds, per expert, the Gram of the
  routed tokens and the Gram of the gated product recomputed from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergecli.errors import StatsError
from mergecli.io.safetensors import TensorInfo

PROJECTIONS = ("gate_up_proj", "down_proj")  # the fused parameters of an experts module
SUPPORTED_OPERATIONS = ("MergeModulelist", "Concatenate")


@dataclass(frozen=True)
class FusedParameter:
    """A parameter that transformers builds from several stored tensors on loading."""

    name: str  # the loaded parameter, e.g. `model.layers.0.mlp.experts.gate_up_proj`
    converter: Any  # transformers' WeightConverter that builds it
    parts: dict[str, list[str]]  # the converter's source pattern → stored tensor names, by expert

    @property
    def stored(self) -> list[str]:
        return [name for names in self.parts.values() for name in names]


def is_experts(module: torch.nn.Module) -> bool:
    """An experts module of the kind transformers fuses (`@use_experts_implementation`)."""
    return all(isinstance(getattr(module, attr, None), torch.nn.Parameter) for attr in PROJECTIONS) \
        and hasattr(module, "_apply_gate")


def refused(kind: str, what: str) -> StatsError:
    """The one-line refusal of a model family (`kind`) whose stored tensors RegMean cannot follow."""
    return StatsError(f"{kind}: {what}: RegMean cannot merge such layers yet",
                      hint="merge this model with average or a task-vector method (mergecli merge)")


def _unsupported(kind: str, stored: str, target: str, why: str) -> StatsError:
    return refused(kind, f"the checkpoint stores {stored} and others that transformers fuses into {target} "
                         f"when it loads this class ({why})")


def fused_parameters(kind: str, renamed: dict[str, str], converters: list[Any]) -> dict[str, FusedParameter]:
    """The stored tensors that each fused parameter of a model of family `kind` is built from, by its
    loaded name, following transformers' converters for its class.

    Args:
        renamed: each stored tensor's name → that name after transformers' key renamings.

    Raises:
        StatsError: the class fuses tensors in a way RegMean cannot follow (other operations, tensors
            not one per expert, missing experts).
    """
    found: dict[str, dict[str, dict[int, str]]] = {}
    converter_of: dict[str, Any] = {}
    for name, loaded in renamed.items():
        for converter in converters:
            target, pattern = converter.rename_source_key(loaded)
            if pattern is None:
                continue
            operations = [type(op).__name__ for op in converter.operations]
            if any(op not in SUPPORTED_OPERATIONS for op in operations):
                raise _unsupported(kind, name, target, f"by {', '.join(operations)}")
            match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), loaded)
            if match is None or not match.groups():
                raise _unsupported(kind, name, target, "not one tensor per expert")
            found.setdefault(target, {}).setdefault(pattern, {})[int(match.group(1))] = name
            converter_of[target] = converter
            break
    fused = {}
    for target, by_pattern in found.items():
        converter = converter_of[target]
        parts = {}
        for pattern in converter.source_patterns:
            experts = by_pattern.get(pattern, {})
            if sorted(experts) != list(range(len(experts))) or not experts:
                raise _unsupported(kind, next(iter(next(iter(by_pattern.values())).values())), target,
                                   f"its experts are not numbered 0..E-1 for {pattern.strip('.')}")
            parts[pattern] = [experts[e] for e in range(len(experts))]
        fused[target] = FusedParameter(target, converter, parts)
    return fused


def load_fused(fused: FusedParameter, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The fused parameter, built from its stored tensors by its converter's own operations."""
    data: dict[str, Any] = {pattern: [read(name) for name in names] for pattern, names in fused.parts.items()}
    sources, targets = list(fused.converter.source_patterns), list(fused.converter.target_patterns)
    for operation in fused.converter.operations:
        data = operation.convert(data, source_patterns=sources, target_patterns=targets)
    (tensor,) = data.values()
    return tensor


def check_experts(module: torch.nn.Module, kind: str, fused: FusedParameter, tensors: dict[str, TensorInfo]) -> None:
    """Refuse an experts module whose computation RegMean's Grams do not follow."""
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = [flag for flag, expected in flags.items() if getattr(module, flag, expected) != expected]
    if odd:
        raise _unsupported(kind, fused.stored[0], fused.name, f"experts with {', '.join(odd)}")
    attr = fused.name.rsplit(".", 1)[-1]
    patterns = len(fused.parts)
    if (attr, patterns) not in (("gate_up_proj", 2), ("down_proj", 1)):
        raise _unsupported(kind, fused.stored[0], fused.name, f"{attr} from {patterns} stored tensors per expert")
    shape = tuple(getattr(module, attr).shape)
    if any(len(names) != shape[0] for names in fused.parts.values()):
        raise _unsupported(kind, fused.stored[0], fused.name,
                           f"{len(next(iter(fused.parts.values())))} stored experts for {shape[0]}")
    rows = sum(tuple(tensors[names[0]].shape)[0] for names in fused.parts.values())
    if any(tuple(tensors[name].shape) != (rows // patterns, shape[2]) for name in fused.stored) or rows != shape[1]:
        raise _unsupported(kind, fused.stored[0], fused.name, f"stored shapes that do not make {list(shape)}")


def expert_key(experts: str, expert: int, projection: str) -> str:
    """The Gram key (and layer path) of one expert's projection: `…experts.3.gate_up_proj`."""
    return f"{experts}.{expert}.{projection}"


class ExpertsHook:
    """A forward pre-hook on an experts module, called as `experts(hidden, top_k_index, top_k_weights)`:
    for each expert, the real tokens routed to it go to `add(key, rows)` for its `gate_up_proj`, and
    the gated product `act(gate) * up` of those rows for its `down_proj`. An expert no token reached
    gets its (empty) rows too, so that every expert has statistics, with its count of 0 tokens.

    Args:
        path: the experts module's path.
        real_rows: the real-token mask of the `(tokens, H)` hidden states (None: all are real).
        wanted: the Gram keys of the experts to sum this time (None: every expert's).
    """

    def __init__(self, path: str, add: Callable[[str, torch.Tensor], None],
                 real_rows: Callable[[torch.Tensor], torch.Tensor | None], wanted: set[str] | None = None):
        self.path, self.add, self.real_rows, self.wanted = path, add, real_rows, wanted

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        real = self.real_rows(hidden)
        for expert in range(module.gate_up_proj.shape[0]):
            if self.wanted is not None and expert_key(self.path, expert, "gate_up_proj") not in self.wanted:
                continue  # summed in another round
            routed = (index == expert).any(dim=-1)
            if real is not None:
                routed &= real
            rows = hidden[routed]  # possibly none: every expert has a Gram, the same on every rank
            self.add(expert_key(self.path, expert, "gate_up_proj"), rows)
            gated = module._apply_gate(torch.nn.functional.linear(rows, module.gate_up_proj[expert]))
            self.add(expert_key(self.path, expert, "down_proj"), gated)
