"""Gram matrices of linear layers' inputs: forward hooks that add xᵀx over the real (unpadded)
tokens of every batch into float64 sums, one matrix per distinct input tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from mergecli.errors import StatsError
from mergecli.regmean.layers import LinearLayer

GRAM_DTYPE = torch.float64
GRAM_BLOCK = 256  # features per block row of a large Gram matrix (measured best on CPU)


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The real-token mask of a linear layer's input rows: `mask` for `(batch, seq, d)` inputs,
    flattened for `(batch·seq, d)` ones; None when every row is real (a pooled `(batch, d)`
    input, image patches, no padding)."""
    if mask is not None:
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return mask
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return mask.reshape(-1)
    return None


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows `(n, d_in)` of a linear layer's input that can hold real tokens: padding rows are
    dropped (CPU) or zeroed (GPU, where boolean indexing would wait for the device to know the row
    count); a zero row adds nothing to xᵀx."""
    x = x.detach()
    rows = row_mask(x, mask)
    if rows is None:
        return x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        return torch.where(rows[..., None], x, 0).reshape(-1, x.shape[-1])
    return x[rows]


_MIXED_MM = True  # torch.mm(..., out_dtype=float32) works for half inputs on this device


def gram_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ right in float32 (float64 for float64 inputs), for one batch's rows `(n, a)`, `(n, b)`.

    Half-precision rows on a GPU go through a half-precision matrix product with float32 output:
    products of bf16 / fp16 numbers are exact in float32, so this loses nothing against upcasting
    first, and runs on the tensor cores at the speed of the forward pass.
    """
    global _MIXED_MM
    if left.dtype in (torch.bfloat16, torch.float16):
        if _MIXED_MM and left.is_cuda:
            try:
                return torch.mm(left.T, right, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                _MIXED_MM = False
        left, right = left.float(), right.float()
    return left.T @ right


class GramCollector:
    """Forward hooks that add xᵀx of each hooked layer's real-token inputs into float64 sums.

    Args:
        model: the loaded model.
        layers: the layers to hook.
        share_inputs: layers reading the same input tensor share one Gram matrix (keyed by the
            first layer that reads it); False stores one per layer (for comparisons).
        block: Grams of more than `2 * block` features are computed a block row at a time, upper
            triangle only (about half the work), and mirrored by `finish()`.

    Example:
        >>> with GramCollector(model, layers) as collector, torch.inference_mode():
        ...     for batch in batches:
        ...         collector.begin_batch(batch.mask)
        ...         model(**batch.inputs)
        >>> sums = collector.finish()
    """

    def __init__(self, model: torch.nn.Module, layers: list[LinearLayer], *, share_inputs: bool = True,
                 block: int = GRAM_BLOCK):
        self.model = model
        self.layers = {layer.module: layer for layer in layers}
        self.share_inputs = share_inputs
        self.block = block
        self.sums: dict[str, torch.Tensor] = {}  # Gram key → (d_in, d_in) float64
        self.tokens: dict[str, int] = {}  # Gram key → real tokens summed over
        self.gram_of: dict[str, str] = {}  # module → Gram key
        self.batch_rows = 0
        self._mask: torch.Tensor | None = None
        self._real: int | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GramCollector:
        modules = dict(self.model.named_modules())
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def begin_batch(self, mask: torch.Tensor | None, *, real_tokens: int | None = None) -> None:
        """Call before each forward pass with the batch's real-token mask (and its count, if known
        without asking the GPU)."""
        self._mask = mask
        self._real = real_tokens if real_tokens is not None or mask is None else int(mask.sum())
        self._seen.clear()
        self.batch_rows = 0

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            key = self._shared_key(name, x)
            if key is None:
                key = name
                rows = real_rows(x, self._mask)
                masked = row_mask(x, self._mask) is not None
                self._add(key, rows, self._real if masked and self._real is not None else rows.shape[0])
            if self.gram_of.setdefault(name, key) != key:
                raise StatsError(f"layer {name} shared its input with {key} in one batch but not in "
                                 "another; cannot store its statistics consistently")

        return hook

    def _shared_key(self, name: str, x: torch.Tensor) -> str | None:
        """The Gram key of a layer that already read this very tensor in this forward pass."""
        if not self.share_inputs:
            return None
        entry = self._seen.get(id(x))
        if entry is not None and entry[0]() is x:  # a live weak reference: not a recycled id
            return entry[1]
        self._seen[id(x)] = (weakref.ref(x), name)
        return None

    def _add(self, key: str, rows: torch.Tensor, tokens: int) -> None:
        d = rows.shape[1]  # rows: (n, d_in), of which `tokens` real
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = torch.zeros((d, d), dtype=GRAM_DTYPE, device=rows.device)
            self.tokens[key] = 0
        if d < 2 * self.block or rows.is_cuda:  # on a GPU, one large product beats many blocks
            total.add_(gram_product(rows, rows))  # float32 for one batch, added into float64
        else:
            for start in range(0, d, self.block):  # block row: its diagonal block and rightwards
                stop = min(d, start + self.block)
                total[start:stop, start:].add_(gram_product(rows[:, start:stop], rows[:, start:]))
        self.tokens[key] += tokens
        self.batch_rows = max(self.batch_rows, tokens)

    def finish(self) -> dict[str, torch.Tensor]:
        """The Gram sums, made whole: blocks below the diagonal are mirrored from above it."""
        with torch.inference_mode():  # the sums were created as inference tensors, in the hooks
            for total in self.sums.values():
                d = total.shape[0]
                if d < 2 * self.block:
                    continue
                for start in range(self.block, d, self.block):
                    stop = min(d, start + self.block)
                    total[start:stop, :start].copy_(total[:start, start:stop].T)
        return self.sums
