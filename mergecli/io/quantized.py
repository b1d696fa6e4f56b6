"""Quantized checkpoints: which stored format a checkpoint's config and tensors show.

A quantized checkpoint stores its weights as codes and scales (`qweight` / `scales` / `qzeros`,
`weight_packed`, `weight_scale_inv`, `*_blocks` / `*_scales`, fp8 values) instead of the floating
`weight` tensors its architecture's class holds. Merged as plain tensors, those codes give a wrong
model, or none at all (transformers then fills the class's weights with random values and says
nothing). The format is read from `config.json`'s `quantization_config` and, where a config says
nothing, from the tensors' names and dtypes: either is enough to know a checkpoint is not plain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mergecli.io.safetensors import TensorInfo

# quant_method → how messages name it
METHOD_NAMES = {
    "fp8": "fp8", "fbgemm_fp8": "fbgemm fp8", "compressed-tensors": "compressed-tensors", "mxfp4": "MXFP4",
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "hqq": "HQQ", "eetq": "EETQ",
    "quanto": "quanto", "torchao": "torchao", "aqlm": "AQLM", "vptq": "VPTQ", "higgs": "HIGGS",
    "bitnet": "BitNet", "spqr": "SpQR", "quark": "Quark", "auto-round": "AutoRound", "gguf": "GGUF",
}

# a tensor name's ending → the format that stores such tensors (checked in this order)
NAME_SIGNS = (
    (re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB)$|\.quant_state\."), "bitsandbytes"),
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ or AWQ"),
    (re.compile(r"\.weight_packed$"), "compressed-tensors pack-quantized"),
    (re.compile(r"\.weight_scale_inv$"), "fp8 block-scaled"),
    (re.compile(r"\.(weight_scale|weight_zero_point|weight_global_scale|input_scale)$"), "compressed-tensors"),
    (re.compile(r"_blocks$"), "MXFP4"),
)
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


@dataclass(frozen=True)
class StoredFormat:
    """A quantized format: its name, and what showed it (a config key or a tensor)."""

    name: str
    evidence: str


def quantization_config(config: dict | None) -> dict | None:
    """The config's `quantization_config` (a multimodal model's text config may hold it instead)."""
    for holder in (config or {}, (config or {}).get("text_config") or {}):
        found = holder.get("quantization_config") if isinstance(holder, dict) else None
        if found is not None:
            return found if isinstance(found, dict) else {"quant_method": str(found)}
    return None


def _configured(settings: dict) -> StoredFormat:
    method = str(settings.get("quant_method", "")).lower()
    name = METHOD_NAMES.get(method, method or "an unnamed quantization")
    if method == "bitsandbytes":
        name += " 8-bit" if settings.get("load_in_8bit") else " 4-bit" if settings.get("load_in_4bit") else ""
    elif method == "fp8" and settings.get("weight_block_size"):
        name = "fp8 block-scaled"
    elif method == "compressed-tensors":
        formats = {str(group.get("format")) for group in (settings.get("config_groups") or {}).values()
                   if isinstance(group, dict) and group.get("format")}
        formats |= {str(settings["format"])} if settings.get("format") else set()
        if formats:
            name += f" ({', '.join(sorted(formats))})"
    return StoredFormat(name, f"quantization_config.quant_method = {method!r}")


def stored_format(config: dict | None, tensors: dict[str, TensorInfo]) -> StoredFormat | None:
    """The quantized format a checkpoint is stored in, or None for plain floating weights.

    Args:
        config: its config.json (None without one).
        tensors: its tensors, as their headers list them.
    """
    settings = quantization_config(config)
    if settings is not None:
        return _configured(settings)
    for pattern, name in NAME_SIGNS:
        found = next((tensor for tensor in tensors if pattern.search(tensor)), None)
        if found is not None and (name != "MXFP4" or found.removesuffix("_blocks") + "_scales" in tensors):
            return StoredFormat(name, f"tensor {found!r}")
    floating8 = next((info.name for info in tensors.values() if info.dtype in FLOAT8), None)
    if floating8 is not None:
        return StoredFormat("fp8", f"tensor {floating8!r} is stored as {str(tensors[floating8].dtype)[6:]}")
    return None
