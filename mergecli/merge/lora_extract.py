"""A model written as a PEFT LoRA adapter of its base: the difference of each tensor from the base's,
factored by a truncated SVD, one tensor at a time (`mergecli extract-lora`, and a merge's
`output_format = "lora"`).

- A Linear's weight W (or an embedding's, or a GPT-2 Conv1D's, stored transposed): Δ = W − W_base ≈ B·A
  with the r largest singular values, B = U_r·S_r [out, r], A = V_rᵀ [r, in] (lora_alpha = r: scale 1). The
  rank is `rank`, or the smallest that brings ‖Δ − B·A‖_F / ‖Δ‖_F under `error` (capped by `rank` if both).
  Each tensor's relative error is exact, from the singular values: √(Σ_{i>r} s_i²) / ‖Δ‖_F.
- Any other tensor that differs (a norm, a bias) puts its module in `modules_to_save`, saved whole.
- An SVD in float64 for tensors up to 2^22 elements; above, in float32, randomized for a fixed rank
  (torch.svd_lowrank, 4 power iterations: its factors span a subspace of Δ, so its error is still exact).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import UsageError
from mergecli.io.architecture import meta_model
from mergecli.io.safetensors import TensorSpec
from mergecli.merge.stream import WholeTensors

EXACT_SVD_ELEMENTS = 1 << 22
DEFAULT_LORA_RANK = 16
PREFIX = "base_model.model."


def module_kinds(directory: Path | None) -> dict[str, str]:
    """Each module's kind (linear, conv1d, embedding) in the class `directory/config.json` names."""
    from transformers.pytorch_utils import Conv1D

    model = meta_model(directory) if directory is not None else None
    kinds = {}
    for name, module in (model.named_modules() if model is not None else []):
        kind = ("linear" if isinstance(module, torch.nn.Linear) else "conv1d" if isinstance(module, Conv1D)
                else "embedding" if isinstance(module, torch.nn.Embedding) else None)
        if kind:
            kinds[name] = kind
    return kinds


def kind_of(module: str, kinds: dict[str, str]) -> str:
    """A checkpoint module's kind (its name may lack or add a prefix such as `model.`); linear if unknown."""
    for name, kind in kinds.items():
        if name == module or name.endswith("." + module) or module.endswith("." + name):
            return kind
    return "embedding" if module.endswith(("embed_tokens", "wte", "word_embeddings")) else "linear"


def factorize(delta: torch.Tensor, *, rank: int | None, error: float | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        float]:
    """(B [m, r], A [r, n], relative error) of Δ's truncated SVD at `rank`, or at the least rank within `error`
    (at most `rank`, when both are given)."""
    smaller = min(delta.shape)
    norm = float(torch.linalg.matrix_norm(delta.double()))
    if norm == 0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1]), 0.0
    if delta.numel() <= EXACT_SVD_ELEMENTS or error is not None:
        work = delta.double() if delta.numel() <= EXACT_SVD_ELEMENTS else delta.float()
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(delta.float(), q=min(smaller, rank + 8), niter=4)
        vh = v.T
    energy = s.double().square()
    left = (norm**2 - torch.cumsum(energy, 0)).clamp(min=0).sqrt() / norm  # error after keeping i + 1 values
    if error is not None:  # the least rank within it (`rank`, when given, the most)
        within = torch.nonzero(left <= error)
        rank = min(int(within[0]) + 1 if len(within) else len(s), rank or len(s))
    rank = min(rank, len(s))
    relative = float(left[rank - 1]) if rank else 1.0
    return (u[:, :rank] * s[:rank]).float().contiguous(), vh[:rank].float().contiguous(), relative


@dataclass
class AdapterWriter:
    """Collects each output tensor's difference from the base as LoRA factors (or whole, in
    modules_to_save), and writes the PEFT folder."""

    base: Any  # the base checkpoint
    rank: int | None = None
    error: float | None = None
    base_name: str | None = None  # base_model_name_or_path: a hub id or a name, never a local absolute path
    kinds: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    saved: set[str] = field(default_factory=set)  # modules whose tensors are saved whole
    pending: dict[str, torch.Tensor] = field(default_factory=dict)  # merged weights of modules with a bias

    def __post_init__(self) -> None:
        self.kinds = module_kinds(getattr(self.base, "directory", None))

    def add(self, name: str, merged: torch.Tensor) -> None:
        """One whole output tensor: kept as factors, as a whole tensor, or not at all (equal to the base's)."""
        base = self.base.read(name)
        delta = merged.double() - base.double()
        if not bool(delta.any()):
            return
        module = name.rsplit(".", 1)[0]
        if delta.dim() != 2 or not name.endswith(".weight"):
            self.saved.add(module)
            self.tensors[f"{PREFIX}{name}"] = merged.to(base.dtype).contiguous()
            return
        if f"{module}.bias" in self.base.tensors:  # saved whole instead, should its bias differ
            self.pending[module] = merged.to(base.dtype).contiguous()
        kind = kind_of(module, self.kinds)
        if self.rank is not None and self.rank > min(delta.shape):
            raise UsageError(f"rank {self.rank} is larger than {name} {list(delta.shape)} allows (at most "
                             f"{min(delta.shape)})", hint="ask for a smaller rank, or for --error / lora_error")
        target = delta.T if kind in ("embedding", "conv1d") else delta  # PEFT applies (B·A)ᵀ to these
        lora_b, lora_a, relative = factorize(target, rank=self.rank, error=self.error)
        a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if kind == "embedding"
                          else ("lora_A.weight", "lora_B.weight"))
        self.tensors[f"{PREFIX}{module}.{a_name}"] = lora_a
        self.tensors[f"{PREFIX}{module}.{b_name}"] = lora_b
        self.ranks[module], self.errors[name] = lora_a.shape[0], relative

    def write(self, directory: Path) -> None:
        from safetensors.torch import save_file

        kept = {m for m in self.ranks if self.ranks[m] > 0}
        conv = [m for m in kept if kind_of(m, self.kinds) == "conv1d"]
        if conv and len(conv) != len([m for m in kept if kind_of(m, self.kinds) != "embedding"]):
            raise UsageError("Conv1D and Linear layers would both need LoRA factors, and PEFT's fan_in_fan_out "
                             "is one setting per adapter", hint="extract a full model instead")
        for module in kept & self.saved:  # its bias differs: the module is saved whole, its weight merged
            for key in [k for k in self.tensors if k.startswith(f"{PREFIX}{module}.lora_")]:
                del self.tensors[key]
            self.tensors[f"{PREFIX}{module}.weight"] = self.pending[module]
            kept.discard(module)
        ranks = {m: self.ranks[m] for m in kept}
        common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": self.base_name,
            "r": common, "lora_alpha": common, "rank_pattern": {m: r for m, r in ranks.items() if r != common},
            "alpha_pattern": {m: r for m, r in ranks.items() if r != common},
            "target_modules": sorted(kept), "modules_to_save": sorted(self.saved) or None,
            "fan_in_fan_out": bool(conv), "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        }
        save_file(self.tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def summary(self) -> str:
        """The card's lines: the relative error of the factors, summed up, and the worst tensors."""
        if not self.errors:
            return "No tensor differs from the base by a matrix: the adapter holds only whole tensors.\n"
        errors = sorted(self.errors.items(), key=lambda item: -item[1])
        mean = math.fsum(self.errors.values()) / len(self.errors)
        lines = [f"{len(errors)} matrices as LoRA factors (ranks {min(self.ranks.values())}–"
                 f"{max(self.ranks.values())}); relative error ‖Δ − B·A‖ / ‖Δ‖: mean {mean:.2e}, worst "
                 f"{errors[0][1]:.2e}.", "", "| tensor | rank | relative error |", "|---|---:|---:|"]
        lines += [f"| {name} | {self.ranks[name.rsplit('.', 1)[0]]} | {value:.2e} |" for name, value in errors[:10]]
        if self.saved:
            lines += ["", f"Saved whole (modules_to_save): {', '.join(sorted(self.saved))}."]
        return "\n".join(lines) + "\n"


class LoraSink(WholeTensors):
    """Where a merge streams its blocks when written as an adapter: each tensor's blocks gathered until it is
    whole (one tensor per worker in memory at a time), then handed to the AdapterWriter."""

    def __init__(self, writer: AdapterWriter, specs: dict[str, TensorSpec]):
        super().__init__(specs, on_whole=writer.add)

    def checkpoint(self) -> Any:
        raise UsageError("output_format = \"lora\" with a method that reads its output back between stages",
                         hint="write the merge in full, then `mergecli extract-lora` it")
