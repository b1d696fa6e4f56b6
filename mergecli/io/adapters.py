"""LoRA adapters as inputs: a PEFT adapter folder read as its base model with the adapter applied to each
tensor as it is read, a block of rows at a time: W + scale·B·A, never a merged model on disk.

What PEFT's `merge_and_unload()` computes, per target module (`base_model.model.<module>.lora_A.weight`
[r, in], `lora_B.weight` [out, r]):
- scale = alpha / r (rsLoRA: alpha / √r), r read off lora_A, alpha from `alpha_pattern` (the longest key that
  ends the module's name) else `lora_alpha`;
- a Linear: W + scale·B·A; `fan_in_fan_out` (GPT-2's Conv1D, W stored [in, out]): W + scale·(B·A)ᵀ;
- an embedding (`lora_embedding_A` [r, vocab], `lora_embedding_B` [dim, r]): W + scale·(B·A)ᵀ;
- DoRA (`lora_magnitude_vector` [out]): m ⊙ (W + ΔW) / ‖W + ΔW‖ per output row, the norm over each row;
- `modules_to_save` (and embeddings saved whole, `base_layer.weight`): the adapter's tensor replaces the base's.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import CheckpointError
from mergecli.io.dequantize import Decoder, QuantizedInfo, Rows, rows_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PARTS = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
                   r"(?:\.weight)?|base_layer\.weight)$")


def adapter_config(directory: Path) -> dict | None:
    """The PEFT adapter config of a folder, or None when it holds none."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise CheckpointError(path, "is not a valid adapter config (a JSON object)") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, "is not a valid adapter config (a JSON object)")
    return config


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the longest key that ends the module's dotted name."""
    found = [key for key in patterns if re.fullmatch(rf"(.*\.)?{key}", module)]
    return float(patterns[max(found, key=len)]) if found else float(default)


class Adapted:
    """A base checkpoint with a LoRA adapter applied as its tensors are read: what the merge sees as one
    model. Every other attribute is the base's (its config, tokenizer files, reads of untouched tensors)."""

    def __init__(self, base: Any, adapter: Any, config: dict, source: str):
        self.base, self.adapter, self.adapter_settings, self.source = base, adapter, config, source
        kind = str(config.get("peft_type", "LORA")).upper()
        if kind != "LORA":
            raise CheckpointError(source, f"is a {kind} adapter; mergecli applies LoRA adapters (and DoRA, rsLoRA)",
                                  hint="merge it into its base with PEFT's merge_and_unload() first")
        self.tensors = dict(base.tensors)
        self.decoders: dict[str, Decoder] = {}
        self.replaced: dict[str, str] = {}  # base tensor → the adapter's whole tensor that replaces it
        modules: dict[str, dict[str, str]] = {}
        for name in adapter.tensors:
            if not name.startswith(PREFIX):
                raise CheckpointError(source, f"adapter tensor {name!r} does not start with {PREFIX!r}, as PEFT "
                                              "names them")
            inner = name.removeprefix(PREFIX)
            match = PARTS.search(inner)
            if match is None:  # modules_to_save: a whole tensor of the base, replaced
                self._replace(inner, name)
                continue
            part = match.group(1).split(".")[0]
            if part == "base_layer":
                self._replace(inner[:match.start()] + ".weight", name)
                continue
            modules.setdefault(inner[:match.start()], {})[part] = name
        for module, parts in modules.items():
            self._adapt(module, parts)

    def _replace(self, target: str, name: str) -> None:
        if target not in self.base.tensors:
            raise CheckpointError(self.source, f"the adapter saves {target!r}, which its base has not",
                                  hint="the adapter was trained on another base; name it with `base = ...`")
        base_info, info = self.base.tensors[target], self.adapter.tensors[name]
        if tuple(base_info.shape) != tuple(info.shape):
            raise CheckpointError(self.source, f"the adapter's {target!r} is {list(info.shape)}, its base's "
                                               f"{list(base_info.shape)}",
                                  hint="the adapter was trained on another base")
        self.replaced[target] = name

    def _adapt(self, module: str, parts: dict[str, str]) -> None:
        target = f"{module}.weight"
        embedding = "lora_embedding_A" in parts
        a_name, b_name = (parts.get("lora_embedding_A"), parts.get("lora_embedding_B")) if embedding \
            else (parts.get("lora_A"), parts.get("lora_B"))
        if a_name is None or b_name is None or target not in self.base.tensors:
            missing = target if target not in self.base.tensors else "its lora_A or lora_B"
            raise CheckpointError(self.source, f"the adapter's module {module!r} lacks {missing} in its base",
                                  hint="the adapter was trained on another base; name it with `base = ...`")
        info = self.base.tensors[target]
        a, b = self.adapter.tensors[a_name].shape, self.adapter.tensors[b_name].shape
        fan_in_fan_out = embedding or bool(self.adapter_settings.get("fan_in_fan_out"))
        rank = a[0]
        delta_shape = (a[1], b[0]) if fan_in_fan_out else (b[0], a[1])
        if len(info.shape) != 2 or tuple(info.shape) != delta_shape or b[1] != rank:
            raise CheckpointError(self.source, f"the adapter's {module!r} (A {list(a)}, B {list(b)}) does not fit its "
                                               f"base's {target!r} {list(info.shape)}",
                                  hint="the adapter was trained on another base; name it with `base = ...`")
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and fan_in_fan_out:
            raise CheckpointError(self.source, f"the adapter's {module!r} is DoRA on an embedding or a fan-in-fan-out "
                                               "layer, which mergecli does not apply",
                                  hint="merge it into its base with PEFT's merge_and_unload() first")
        settings = self.adapter_settings
        alpha = _pattern_value(settings.get("alpha_pattern") or {}, module, settings.get("lora_alpha", 8))
        scale = alpha / rank ** 0.5 if settings.get("use_rslora") else alpha / rank
        read_base, read_adapter = self.base.read, self.adapter.read

        def decode(_read: Any, rows: Rows) -> torch.Tensor:
            start, stop = rows_of(rows, info.shape[0])
            weight = read_base(target, rows).to(torch.float32)
            lora_a, lora_b = read_adapter(a_name).float(), read_adapter(b_name).float()
            if fan_in_fan_out:
                delta = (lora_b @ lora_a[:, start:stop]).T
            else:
                delta = lora_b[start:stop] @ lora_a
            weight += scale * delta
            if magnitude is not None:
                norm = torch.linalg.vector_norm(weight, dim=1)
                weight *= (read_adapter(magnitude).float()[start:stop] / norm)[:, None]
            return weight

        stored_as = "DoRA" if magnitude is not None else "LoRA"
        logical = QuantizedInfo(target, torch.float32, tuple(info.shape), info.file, -1, stored_as=stored_as,
                                plain_dtype=info.dtype)
        self.tensors[target] = logical
        self.decoders[target] = Decoder(logical, (a_name, b_name), decode)

    def read(self, name: str, rows: tuple[int, int] | None = None, *, buffer: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
        decoder = self.decoders.get(name)
        if decoder is not None:
            return decoder.decode(None, rows)
        if name in self.replaced:
            whole = self.adapter.read(self.replaced[name])
            return whole[rows[0]:rows[1]] if rows else whole
        return self.base.read(name, rows, buffer=buffer, **kwargs)

    def remote_reads(self, name: str, rows: tuple[int, int] | None) -> list:
        return [] if name in self.decoders or name in self.replaced else self.base.remote_reads(name, rows)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.base.fingerprint()}|{self.adapter.fingerprint()}".encode()).hexdigest()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(f"{self.base.digest()}|{self.adapter.digest()}".encode()).hexdigest()

    def first_rows_digest(self, names: Any) -> str:
        return hashlib.sha256(f"{self.base.first_rows_digest(names)}|{self.adapter.digest()}".encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.adapter.nbytes

    def close(self) -> None:
        self.adapter.close()
        self.base.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)
