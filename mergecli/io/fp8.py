"""fp8 block-scaled output (DeepSeek-V3's layout, transformers' FineGrainedFP8): each chosen weight stored as
float8_e4m3fn with a float32 `weight_scale_inv` per tile of rows × columns, requantized from the float32
merge a block of rows at a time (row blocks are whole tiles: `Fp8Output.align`).

The scale is computed as transformers' `Fp8Quantize` computes it, so that a checkpoint written here loads
as one it wrote: per tile, s = 448 / max|w| (1 for an all-zero tile), the values stored as fp8(clamp(w·s)),
and 1/s as `weight_scale_inv` (the factor that dequantizes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mergecli.io.blocks import block_of
from mergecli.io.dequantize import FP8_MAX
from mergecli.io.safetensors import TensorSpec

FP8 = torch.float8_e4m3fn
DEFAULT_TILE = (128, 128)
NOT_QUANTIZED = ("norm", "router", ".gate.weight", "embed", "lm_head")  # kept in 16 bits, as DeepSeek keeps them


def scale_name(name: str) -> str:
    return name.removesuffix(".weight") + ".weight_scale_inv"


def fits(shape: tuple[int, ...], tile: tuple[int, int]) -> bool:
    """A matrix whose rows and columns are whole tiles (what transformers quantizes and loads as fp8)."""
    return len(shape) == 2 and shape[0] % tile[0] == 0 and shape[1] % tile[1] == 0


def quantizable(name: str, shape: tuple[int, ...], tile: tuple[int, int]) -> bool:
    """A linear layer's weight inside the model's blocks, of whole tiles (norms, routers, embeddings and
    the head stay in 16 bits)."""
    return (name.endswith(".weight") and block_of(name) is not None and fits(shape, tile)
            and not any(word in name for word in NOT_QUANTIZED))


def quantize(values: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 rows [n, c] (n and c whole tiles, or the matrix's last rows) as fp8 and their scales."""
    rows, cols = values.shape
    tiles = values.reshape(-(-rows // tile[0]), tile[0], cols // tile[1], tile[1]) if rows % tile[0] == 0 else None
    if tiles is None:  # a last block shorter than a tile: only when the rows are not whole tiles
        raise ValueError(f"rows {rows} are not whole tiles of {tile[0]}")
    largest = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(largest > 0, FP8_MAX / largest, torch.ones_like(largest))
    scaled = (tiles * scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(FP8).reshape(rows, cols), (1.0 / scale).to(torch.float32)


@dataclass(frozen=True)
class Fp8Output:
    """Which output tensors are stored fp8 block-scaled, and the tile."""

    tile: tuple[int, int]
    names: frozenset[str]
    settings: dict = field(default_factory=dict, hash=False)  # the quantization_config to write

    def stored(self, specs: list[TensorSpec]) -> list[TensorSpec]:
        """The output's stored tensors: each chosen one as fp8 followed by its scales."""
        out = []
        for spec in specs:
            if spec.name not in self.names:
                out.append(spec)
                continue
            rows, cols = spec.shape
            out.append(TensorSpec(spec.name, FP8, spec.shape))
            out.append(TensorSpec(scale_name(spec.name), torch.float32, (rows // self.tile[0], cols // self.tile[1])))
        return out

    def config(self, specs: list[TensorSpec]) -> dict:
        """The quantization_config to write: the input's where it had one, else transformers' fp8 one, with
        every other matrix's module named in modules_to_not_convert (transformers would make it fp8)."""
        kept = sorted({spec.name.removesuffix(".weight") for spec in specs
                       if len(spec.shape) == 2 and spec.name.endswith(".weight") and spec.name not in self.names})
        settings = dict(self.settings or {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"})
        settings["weight_block_size"] = list(self.tile)
        settings["modules_to_not_convert"] = sorted(set(settings.get("modules_to_not_convert") or []) | set(kept))
        return settings
