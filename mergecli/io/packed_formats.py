"""Quantized formats that pack several values into a byte or a word (io/dequantize.py has the rest).

- MXFP4 (gpt-oss' experts): `*_blocks` [E, out, in/32, 16] of e2m1 nibbles (low nibble first) and
  `*_scales` [E, out, in/32] of e8m0 exponents (+127); the class holds [E, in, out], the transpose.
- GPTQ (AutoGPTQ v1 and v2): `qweight` [in·bits/32, out] packing input rows, `qzeros` [groups, out·bits/32]
  (zero − 1 in v1), `scales` [groups, out], `g_idx` [in] (act-order), value = scale × (q − zero).
- AWQ (GEMM): `qweight` [in, out/8] and `qzeros` [groups, out/8] packing output columns in the order
  0 2 4 6 1 3 5 7, `scales` [groups, out].

GPTQ and AWQ pack a Linear's output features (the class's rows) along their columns: a block of rows is
not a block of their bytes, so their parts are read whole once per pass over the tensor and kept until
every row has been read.
"""

from __future__ import annotations

import threading

import torch

from mergecli.io.dequantize import Decoder, FormatError, Parts, QuantizedInfo, ReadStored, Rows, rows_of
from mergecli.io.safetensors import TensorInfo

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] of MXFP4 `blocks` [..., n/32, 16] (uint8, two e2m1 codes a byte, low nibble first)
    and `scales` [..., n/32] (uint8 exponents + 127)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)
    values = E2M1[codes.long()]
    values.mul_(torch.exp2(scales.float() - 127)[..., None])
    return values.reshape(*blocks.shape[:-2], -1)


def mxfp4(settings: dict, tensors: dict[str, TensorInfo], take: Parts) -> list[Decoder]:
    decoders = []
    for name in [n for n in tensors if n.endswith("_blocks")]:
        logical = name.removesuffix("_blocks")
        blocks, scales = take(name), take(f"{logical}_scales")
        ok = (blocks.dtype == torch.uint8 and scales.dtype == torch.uint8 and len(blocks.shape) == 4
              and blocks.shape[-1] == 16 and tuple(scales.shape) == tuple(blocks.shape[:-1]))
        if not ok:
            raise FormatError(f"tensors {name!r} {list(blocks.shape)} and {logical + '_scales'!r} "
                              f"{list(scales.shape)} are not MXFP4 experts ([E, out, in/32, 16] and [E, out, in/32] "
                              "uint8)")
        experts, out_features, groups, _ = blocks.shape
        shape = (experts, groups * 32, out_features)  # the class's layout: [E, in, out]

        def decode(read: ReadStored, rows: Rows, blocks: str = name, scales: str = scales.name) -> torch.Tensor:
            return mxfp4_values(read(blocks, rows), read(scales, rows)).transpose(1, 2).contiguous()

        def reads(rows: Rows, blocks: str = name, scales: str = scales.name) -> list[tuple[str, Rows]]:
            return [(blocks, rows), (scales, rows)]

        info = QuantizedInfo(logical, torch.float32, shape, blocks.file, -1, stored_as="MXFP4")
        decoders.append(Decoder(info, (name, scales.name), decode, reads))
    return decoders




class _WholeParts:
    """A tensor's parts read whole, shared by the blocks of one pass, and let go once every row is read."""

    def __init__(self, parts: tuple[str, ...], rows: int):
        self.parts, self.rows = parts, rows
        self.lock = threading.Lock()
        self.held: dict[str, torch.Tensor] | None = None
        self.left = 0

    def get(self, read: ReadStored, rows: Rows) -> dict[str, torch.Tensor]:
        start, stop = rows_of(rows, self.rows)
        with self.lock:
            if self.held is None:
                self.held, self.left = {part: read(part, None) for part in self.parts}, self.rows
            held = self.held
            self.left -= stop - start
            if self.left <= 0:
                self.held = None
        return held


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed word holds column AWQ_ORDER[k] of its eight


def _unpack_columns(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[r, c·per] int64 codes of int32 words [r, c] packing `per` = 32/bits columns each, the lowest bits first
    (nibble k holding column order[k] of its group, for AWQ)."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)  # [r, c, per]: nibble k
    if order is not None:
        codes = codes[..., list(torch.argsort(torch.tensor(order)))]
    return codes.reshape(packed.shape[0], -1)


def gptq_family(settings: dict, tensors: dict[str, TensorInfo], take: Parts,
                 method: str) -> list[Decoder]:
    bits = int(settings.get("bits", settings.get("w_bit", 4)))
    group = int(settings.get("group_size", settings.get("q_group_size", 128)))
    if bits not in (2, 4, 8) or (method == "awq" and bits != 4):
        raise FormatError(f"{bits}-bit {method.upper()} is not read (GPTQ: 2, 4 or 8 bits; AWQ: 4)")
    version = str(settings.get("version", "gemm")).lower()
    if method == "awq" and version != "gemm":
        raise FormatError(f"AWQ's {version} layout is not read (its GEMM layout is)")
    v1 = method == "gptq" and str(settings.get("checkpoint_format", "gptq")).lower() == "gptq"
    per = 32 // bits
    decoders = []
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name.removesuffix(".qweight")
        qweight, qzeros, scales = take(name), take(f"{prefix}.qzeros"), take(f"{prefix}.scales")
        g_idx = take(f"{prefix}.g_idx") if f"{prefix}.g_idx" in tensors else None
        if method == "gptq":
            in_features, out_features = qweight.shape[0] * per, qweight.shape[1]
        else:
            in_features, out_features = qweight.shape[0], qweight.shape[1] * per
        groups = 1 if group <= 0 else -(-in_features // group)
        ok = (qweight.dtype == qzeros.dtype == torch.int32 and tuple(scales.shape) == (groups, out_features)
              and tuple(qzeros.shape) == (groups, out_features // per) and scales.dtype.is_floating_point
              and (g_idx is None or tuple(g_idx.shape) == (in_features,)))
        if not ok:
            raise FormatError(f"the tensors of {prefix!r} (qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                              f"scales {list(scales.shape)}) do not match {bits}-bit {method.upper()} in groups of "
                              f"{group}")
        parts = tuple(p.name for p in (qweight, qzeros, scales, g_idx) if p is not None)
        whole = _WholeParts(parts, out_features)
        size = in_features if group <= 0 else group

        def decode(read: ReadStored, rows: Rows, whole: _WholeParts = whole, names: tuple = parts,
                   in_features: int = in_features, size: int = size, out_features: int = out_features) -> torch.Tensor:
            start, stop = rows_of(rows, out_features)
            held = whole.get(read, rows)
            low, high = start // per, -(-stop // per)
            skip = start - low * per
            if method == "gptq":
                codes = _unpack_columns(held[names[0]][:, start:stop].T.contiguous(), bits).T  # [in, n]
            else:
                codes = _unpack_columns(held[names[0]][:, low:high], bits, AWQ_ORDER)[:, skip:skip + stop - start]
            zeros = _unpack_columns(held[names[1]][:, low:high], bits, None if method == "gptq" else AWQ_ORDER)
            zeros = zeros[:, skip:skip + stop - start] + (1 if v1 else 0)
            table = held[names[2]][:, start:stop].float()
            index = (held[names[3]].long() if len(names) > 3 else torch.arange(in_features) // size)
            values = (codes - zeros[index]).float().mul_(table[index])  # [in, n]
            return values.T.contiguous()

        info = QuantizedInfo(f"{prefix}.weight", torch.float32, (out_features, in_features), qweight.file, -1,
                             stored_as=method.upper())
        decoders.append(Decoder(info, parts, decode))
    return decoders
