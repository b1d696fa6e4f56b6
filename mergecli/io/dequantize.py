"""Quantized checkpoints read as the floating tensors their model class holds, dequantized as they are read.

A quantized checkpoint stores each quantized weight as parts: codes (fp8 values, int8, int4 packed into
int32, e2m1 nibbles) and scales (and zero points). Each format below turns its parts into one logical
tensor under the class's name, exact (float32, or float64 where a float32 scale times a code needs more
than float32's 24 bits) (`...q_proj.weight`, gpt-oss' `experts.gate_up_proj`), a block of
rows at a time, so that a merge, RegMean's statistics and its merge read it as any other tensor. Tensors a
format leaves as they are (norms, embeddings, often the head) are read as they are.

- fp8 with block scales (DeepSeek-V3, Qwen3 FP8; transformers' FineGrainedFP8): `weight` float8_e4m3fn,
  `weight_scale_inv` float32 per `weight_block_size` tile, value = fp8 × scale.
- compressed-tensors (`float-quantized`, `int-quantized`, `pack-quantized`): `weight` (fp8 or int8) or
  `weight_packed` (int32, `num_bits` a value, densely packed along each row, offset by 2^(bits−1)) with
  `weight_shape`, `weight_scale` per tensor / channel / group / block and `weight_zero_point` for
  asymmetric schemes (packed along the rows in pack-quantized), value = (q − zero) × scale.

MXFP4, GPTQ and AWQ, which pack several values into a byte or a word, are in io/packed_formats.py;
io/decoders.py picks a checkpoint's format from its config.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mergecli.io.precision import for_requantization
from mergecli.io.safetensors import TensorInfo

Rows = tuple[int, int] | None
ReadStored = Callable[[str, Rows], torch.Tensor]  # a stored tensor, or rows of it
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


class FormatError(ValueError):
    """A checkpoint whose tensors do not match its quantization_config (said in one line)."""


@dataclass(frozen=True)
class QuantizedInfo(TensorInfo):
    """A logical tensor that is stored quantized (or as a LoRA adapter's base and factors): `stored_as` names
    the format, `block` the fp8 tile."""

    stored_as: str = ""
    block: tuple[int, int] | None = None
    plain_dtype: torch.dtype | None = None  # what `dtype = "auto"` writes it as (None: bfloat16)


@dataclass
class Decoder:
    """One logical tensor's parts and how a block of its rows is decoded from them."""

    info: QuantizedInfo
    parts: tuple[str, ...]
    decode: Callable[[ReadStored, Rows], torch.Tensor]
    reads: Callable[[Rows], list[tuple[str, Rows]]] = field(default=lambda rows: [])  # the reads decode makes


def rows_of(rows: Rows, count: int) -> tuple[int, int]:
    return rows if rows is not None else (0, count)


def _tiles(rows: tuple[int, int], tile: int) -> tuple[int, int]:
    """The rows of a per-tile table that rows `[start, stop)` fall in."""
    return rows[0] // tile, -(-rows[1] // tile)


def _expand(table: torch.Tensor, rows: tuple[int, int], tile_rows: int, tile_cols: int, cols: int) -> torch.Tensor:
    """A per-tile table (its rows from `_tiles(rows, tile_rows)`) spread over rows `rows` and `cols` columns."""
    if tile_rows > 1:
        skip = rows[0] - rows[0] // tile_rows * tile_rows
        table = table.repeat_interleave(tile_rows, 0)[skip:skip + rows[1] - rows[0]]
    if tile_cols > 1:
        table = table.repeat_interleave(tile_cols, 1)[:, :cols]
    return table.expand(rows[1] - rows[0], cols)


def _scaled(values: torch.Tensor, table: torch.Tensor, rows: tuple[int, int], tile: tuple[int, int]) -> torch.Tensor:
    """values [n, cols] (float32) × their per-tile scales, in place; by tiles when the columns divide."""
    cols = values.shape[1]
    if tile[1] > 1 and cols % tile[1] == 0 and table.shape[1] == cols // tile[1]:
        if tile[0] > 1:
            table = _expand(table, rows, tile[0], 1, table.shape[1])
        values.view(values.shape[0], -1, tile[1]).mul_(table[:, :, None])
        return values
    return values.mul_(_expand(table, rows, *tile, cols))


class Parts:
    """Hands out each stored tensor to one decoder at most (`parts(name)`), and reads a small one whole."""

    def __init__(self, tensors: dict[str, TensorInfo], read: ReadStored):
        self.tensors, self.read, self.taken = tensors, read, set()

    def __call__(self, name: str, *, optional: bool = False) -> TensorInfo | None:
        info = self.tensors.get(name)
        if info is None:
            if optional:
                return None
            raise FormatError(f"tensor {name!r}, which its format stores beside the others, is missing")
        if name in self.taken:
            raise FormatError(f"tensor {name!r} is a part of two quantized tensors")
        self.taken.add(name)
        return info


# ---------------------------------------------------------------------------------------------
# fp8 with block scales


def fp8_block(settings: dict, tensors: dict[str, TensorInfo], take: Parts) -> list[Decoder]:
    block = settings.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise FormatError(f"its quantization_config's weight_block_size is {block!r}, not two positive integers "
                          "(fp8 without block scales is read as compressed-tensors)")
    tile = (block[0], block[1])
    decoders = []
    for name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        weight = name.removesuffix("_scale_inv")
        info, scale = take(weight), take(name)
        if info.dtype != torch.float8_e4m3fn or len(info.shape) < 2:
            raise FormatError(f"tensor {weight!r} is {str(info.dtype)[6:]} {list(info.shape)}, where its "
                              "weight_scale_inv says float8_e4m3fn of two or more dimensions")
        *lead, rows, cols = info.shape
        wanted = (*lead, -(-rows // tile[0]), -(-cols // tile[1]))
        if tuple(scale.shape) != wanted or not scale.dtype.is_floating_point:
            raise FormatError(f"tensor {name!r} is {list(scale.shape)}, where weight_block_size {list(tile)} "
                              f"over {list(info.shape)} asks for {list(wanted)}")
        decoders.append(_fp8_decoder(info, scale.name, tile, "fp8 block-scaled", scale.dtype))
    return decoders


def _pair_table() -> np.ndarray:
    """Every pair of float8_e4m3fn bytes (read as one little-endian uint16) → the two values as bf16 (int32):
    each fp8 value is exact in bf16, and a lookup per two bytes costs a sixth of torch's fp8 conversion."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.bfloat16).view(torch.int16)
    pairs = np.arange(65536, dtype="<u2").view(np.uint8).reshape(-1, 2).astype(np.int64)
    return np.ascontiguousarray(values.numpy()[pairs]).reshape(-1).view(np.int32)


FP8_PAIRS = _pair_table()


def fp8_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn codes as `dtype`, through FP8_PAIRS (torch's conversion where the count is odd)."""
    if codes.numel() % 2 or not codes.is_contiguous() or sys.byteorder != "little":
        return codes.to(dtype)
    pairs = np.take(FP8_PAIRS, codes.view(torch.uint8).numpy().reshape(-1).view(np.uint16))
    return torch.from_numpy(pairs).view(torch.bfloat16).view(codes.shape).to(dtype)


def exact_dtype(scale: torch.dtype) -> torch.dtype:
    """What a code (8 significant bits at most) times a scale of dtype `scale` is exact in: float32 for a
    16-bit scale, float64 for a float32 one (its 24 bits and the code's overflow float32's 24)."""
    return torch.float32 if scale in (torch.float16, torch.bfloat16) else torch.float64


def _fp8_decoder(info: TensorInfo, scale: str, tile: tuple[int, int], stored_as: str,
                 scale_dtype: torch.dtype) -> Decoder:
    weight, shape = info.name, info.shape

    def reads(rows: Rows) -> list[tuple[str, Rows]]:
        if len(shape) > 2:  # rows are experts: each has its own tiles
            return [(weight, rows), (scale, rows)]
        return [(weight, rows), (scale, _tiles(rows_of(rows, shape[0]), tile[0]))]

    dtype = exact_dtype(scale_dtype)

    def decode(read: ReadStored, rows: Rows) -> torch.Tensor:
        (_, value_rows), (_, scale_rows) = reads(rows)
        wanted = torch.float32 if for_requantization() else dtype  # requantized to fp8: float32 is plenty
        values, table = fp8_values(read(weight, value_rows), wanted), read(scale, scale_rows).to(wanted)
        if len(shape) > 2:
            flat = values.reshape(-1, *shape[-2:])
            tables = table.reshape(-1, *table.shape[-2:])
            for k in range(flat.shape[0]):
                _scaled(flat[k], tables[k], (0, shape[-2]), tile)
            return values
        return _scaled(values, table, rows_of(rows, shape[0]), tile)

    logical = QuantizedInfo(weight, dtype, shape, info.file, -1, stored_as=stored_as, block=tile)
    return Decoder(logical, (weight, scale), decode, reads)


# ---------------------------------------------------------------------------------------------
# compressed-tensors


def _unpack_dense(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32` undone: `count` values of `bits` bits per row, value i at bit
    i·bits of the row's little-endian stream, less the offset 2^(bits−1) (int32 [rows, count])."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(words.shape[0], 1, dtype=torch.int64)], 1)  # a value may straddle
    start = torch.arange(count) * bits
    index, shift = start // 32, start % 32
    low = words[:, index] >> shift
    high = words[:, torch.clamp(index + 1, max=words.shape[1] - 1)] << (32 - shift)
    values = (low | torch.where(shift + bits > 32, high, 0)) & ((1 << bits) - 1)
    return (values - (1 << (bits - 1))).to(torch.int32)


def _scheme_for(prefix: str, groups: dict) -> tuple[str, dict]:
    """The config group (its name and settings) whose targets hold module `prefix`."""
    for name, group in groups.items():
        for target in group.get("targets") or []:
            if str(target).startswith("re:") and re.match(str(target)[3:], prefix):
                return name, group
    classes = [(name, group) for name, group in groups.items()
               if any(not str(t).startswith("re:") for t in group.get("targets") or [])]
    if len(classes) == 1 or (classes and len(groups) == len(classes)):
        return classes[0]
    raise FormatError(f"no config group of its quantization_config targets {prefix!r}")


def compressed_tensors(settings: dict, tensors: dict[str, TensorInfo],
                        take: Parts) -> list[Decoder]:
    groups = {k: v for k, v in (settings.get("config_groups") or {}).items() if isinstance(v, dict)}
    decoders = []
    for scale_name in [n for n in tensors if n.endswith(".weight_scale")]:
        prefix = scale_name.removesuffix(".weight_scale")
        group_name, group = _scheme_for(prefix, groups)
        fmt = str(group.get("format") or settings.get("format") or "")
        args = group.get("weights") or {}
        where = f"config group {group_name!r} ({fmt})"
        if fmt not in ("pack-quantized", "int-quantized", "float-quantized"):
            raise FormatError(f"{where}: the {fmt or 'unnamed'} format is not read (float-quantized, int-quantized "
                              "and pack-quantized are)")
        if args.get("actorder") not in (None, "static", "weight", False) or args.get("strategy") == "tensor_group":
            raise FormatError(f"{where}: {args.get('strategy')} weights with actorder {args.get('actorder')!r} "
                              "are not read")
        decoders.append(_ct_decoder(prefix, fmt, args, where, take))
    return decoders


CODE_DTYPES = {"float-quantized": torch.float8_e4m3fn, "int-quantized": torch.int8, "pack-quantized": torch.int32}


def _ct_decoder(prefix: str, fmt: str, args: dict, where: str, take: Parts) -> Decoder:
    bits, kind = int(args.get("num_bits", 8)), str(args.get("type", "int"))
    strategy, symmetric = str(args.get("strategy", "tensor")), bool(args.get("symmetric", True))
    scale = take(f"{prefix}.weight_scale")
    if fmt == "pack-quantized":  # the shape is stored beside the packed codes
        packed, shape_info, shape = take(f"{prefix}.weight_packed"), take(f"{prefix}.weight_shape"), None
    else:
        packed, shape_info = take(f"{prefix}.weight"), None
        shape = packed.shape
    codes_name = packed.name
    expected = CODE_DTYPES[fmt]
    if packed.dtype != expected or (fmt == "float-quantized") != (kind == "float") or not 1 <= bits <= 8:
        raise FormatError(f"tensor {codes_name!r} is {str(packed.dtype)[6:]}, where {where} stores {bits}-bit "
                          f"{kind} codes as {str(expected)[6:]}")
    if shape is None:
        shape = tuple(int(v) for v in take.read(shape_info.name, None).reshape(-1).tolist())
    if len(shape) != 2:
        raise FormatError(f"tensor {codes_name!r} holds {list(shape)}, not a matrix")
    rows, cols = shape
    tile = {"tensor": (rows, cols), "channel": (1, cols), "group": (1, args.get("group_size") or cols),
            "block": tuple(args.get("block_structure") or (0, 0))}.get(strategy)
    if tile is None or not all(isinstance(t, int) and t > 0 for t in tile):
        raise FormatError(f"{where}: {strategy} weights with {args.get('group_size') or args.get('block_structure')}"
                          " are not read")
    wanted = (-(-rows // tile[0]), -(-cols // tile[1]))
    if math.prod(scale.shape) != math.prod(wanted) or (strategy != "tensor" and tuple(scale.shape) != wanted):
        raise FormatError(f"tensor {scale.name!r} is {list(scale.shape)}, where {strategy} scales over "
                          f"{list(shape)} ask for {list(wanted)}")
    zero = take(f"{prefix}.weight_zero_point", optional=symmetric)
    zero = None if symmetric else zero  # a symmetric scheme may store zeros: all 0
    zero_packed = zero is not None and fmt == "pack-quantized" and strategy in ("group", "channel")
    stored_as = f"compressed-tensors {fmt} ({kind}{bits} {strategy})"
    dtype = exact_dtype(scale.dtype)

    def decode(read: ReadStored, block: Rows) -> torch.Tensor:
        span = rows_of(block, rows)
        raw = read(codes_name, block)
        q = _unpack_dense(raw, bits, cols) if fmt == "pack-quantized" else raw
        values = fp8_values(q, dtype) if q.dtype == torch.float8_e4m3fn else q.to(dtype)
        table_rows = _tiles(span, tile[0])
        table = read(scale.name, None).to(dtype).reshape(wanted)[table_rows[0]:table_rows[1]]
        if zero is not None:
            zeros = read(zero.name, None)
            zeros = (_unpack_dense(zeros.T.contiguous(), bits, wanted[0]).T if zero_packed else zeros)
            zeros = zeros.to(dtype).reshape(wanted)[table_rows[0]:table_rows[1]]
            values = values.sub_(_expand(zeros, span, *tile, cols))
        return _scaled(values, table, span, tile)

    logical = QuantizedInfo(f"{prefix}.weight", dtype, shape, packed.file, -1, stored_as=stored_as)
    parts = tuple(n for n in (codes_name, scale.name, zero.name if zero else None,
                              shape_info.name if shape_info else None) if n)
    return Decoder(logical, parts, decode)
