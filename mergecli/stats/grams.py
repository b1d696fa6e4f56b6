"""Gram matrices of linear layers' inputs: forward pre-hooks that add xᵀx over the real (unpadded)
tokens of every batch, one sum per distinct input tensor, kept as the upper triangle only.

A sum is held by block rows (rows s..s+b against columns s..d: about half the work and memory of
the square). Products are taken in float32 and staged over about d tokens before they are added
into the float64 sum: adding a d×d float64 matrix after every short batch would cost more than the
product itself. float64 inputs (float64 checkpoints) are summed in float64 directly, exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from mergecli.errors import StatsError
from mergecli.stats.experts import ExpertsHook, is_experts
from mergecli.stats.layers import LinearLayer

GRAM_DTYPE = torch.float64
# A Gram diagonal at or below this fraction of the largest one counts as a feature that never fired.
DEAD_FEATURE_TOLERANCE = 1e-12
GRAM_BLOCK = 256  # rows per block row of a sum on CPU (measured best there)
ENTRY_BYTES = 12  # per entry of a Gram's upper triangle while it is summed: float64, and float32 staging
GRAM_BLOCK_CUDA = 2048  # on a GPU, larger products beat more of them


def never_fired(diagonal: torch.Tensor) -> torch.Tensor:
    """Indices of the (numerically) zero entries of a Gram's diagonal `(d_in,)`: input features that
    no calibration token activated."""
    largest = float(diagonal.abs().max()) if diagonal.numel() else 0.0
    return torch.nonzero(diagonal.abs() <= DEAD_FEATURE_TOLERANCE * largest).flatten()


def packed_size(d: int) -> int:
    """Elements of the upper triangle (diagonal included) of a d×d matrix."""
    return d * (d + 1) // 2


def row_offsets(d: int) -> torch.Tensor:
    """Where each row of the upper triangle starts in the packed (row-major) vector: the diagonal."""
    i = torch.arange(d, dtype=torch.int64)
    return i * d - i * (i - 1) // 2


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


def gram_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ right in float32 for half-precision rows `(n, a)`, `(n, b)`: products of bf16 / fp16
    numbers are exact in float32, and on a GPU the mixed product runs on the tensor cores."""
    if left.is_cuda:
        try:
            return torch.mm(left.T, right, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    return left.float().T @ right.float()


class GramSum:
    """Σ xᵀx of one input over the tokens added, upper triangle by block rows, float64."""

    def __init__(self, d: int, *, device: torch.device | str, block: int, staged: bool):
        self.d = d
        self.rows = [(s, min(d, s + block)) for s in range(0, d, block)]
        self.total = [torch.zeros((e - s, d - s), dtype=GRAM_DTYPE, device=device) for s, e in self.rows]
        self.staging = [torch.zeros((e - s, d - s), dtype=torch.float32, device=device)
                        for s, e in self.rows] if staged else None
        self.staged_rows = 0
        self.tokens = 0

    def add(self, x: torch.Tensor, tokens: int) -> None:
        """Add the rows `x` `(n, d)`, of which `tokens` are real."""
        target = self.staging if self.staging is not None else self.total
        if x.dtype not in (torch.float32, torch.float64):
            for (s, e), part in zip(self.rows, target):
                part.add_(gram_product(x[:, s:e], x[:, s:]))
        else:
            x = x.to(target[0].dtype)
            for (s, e), part in zip(self.rows, target):
                part.addmm_(x[:, s:e].T, x[:, s:])
        self.tokens += tokens
        self.staged_rows += x.shape[0]
        if self.staging is not None and self.staged_rows >= self.d:
            self.flush()

    def flush(self) -> None:
        """Add the float32 staging into the float64 sum."""
        if self.staging is not None and self.staged_rows:
            with torch.inference_mode():  # the sums were made in the hooks, as inference tensors
                for part, staged in zip(self.total, self.staging):
                    part.add_(staged)
                    staged.zero_()
        self.staged_rows = 0

    def done(self) -> GramSum:
        """Flush the staging and free it: the sum is final."""
        self.flush()
        self.staging = None
        return self

    def chunks(self) -> Iterator[list[torch.Tensor]]:
        """The upper triangle, row by row (row i: columns i..d-1), as lists of contiguous float64 CPU
        rows, a block row per list: what the packed vector holds, without building it."""
        self.done()
        for (s, e), part in zip(self.rows, self.total):
            part = part.cpu()
            yield [part[i - s, i - s:] for i in range(s, e)]

    def diagonal(self) -> torch.Tensor:
        return torch.cat([part[:, :e - s].diagonal().cpu() for (s, e), part in zip(self.rows, self.total)])

    def packed(self) -> torch.Tensor:
        """The upper triangle as one float64 CPU vector of d(d+1)/2 elements."""
        return torch.cat([row for rows in self.chunks() for row in rows])


class UpperTriangle(Protocol):
    """A Gram matrix's upper triangle as the statistics store writes it (`GramSum`, `Packed`)."""

    d: int

    def chunks(self) -> Iterator[list[torch.Tensor]]: ...

    def diagonal(self) -> torch.Tensor: ...


class Packed:
    """An upper triangle already packed in one vector, seen like a `GramSum`."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector
        self.d = int(((8 * vector.numel() + 1) ** 0.5 - 1) / 2)
        if packed_size(self.d) != vector.numel():
            raise ValueError(f"{vector.numel()} elements are not the upper triangle of a square matrix")

    def chunks(self) -> Iterator[list[torch.Tensor]]:
        yield [self.vector]

    def diagonal(self) -> torch.Tensor:
        return self.vector[row_offsets(self.d)]


class GramCollector:
    """Forward pre-hooks adding each hooked layer's real-token inputs into a `GramSum`.

    Args:
        modules: module path → the `nn.Linear` / `Conv1D` to hook (they may be added and removed
            while the collector lives: `hook` / `unhook`).
        share_inputs: layers reading the same input tensor in a forward pass share one sum (keyed
            by the first layer that reads it); False keeps one per layer.

    Example:
        >>> with GramCollector(block_modules) as collector, torch.inference_mode():
        ...     for batch in batches:
        ...         collector.begin_batch(batch.mask)
        ...         block(hidden)
        >>> packed = {key: s.packed() for key, s in collector.sums.items()}
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, share_inputs: bool = True,
                 experts: set[str] | None = None):
        self.modules = modules
        self.share_inputs = share_inputs
        self.experts = experts  # the expert Grams to sum (`expert_key`s; None: every expert's)
        self.sums: dict[str, GramSum] = {}  # Gram key → its sum
        self.gram_of: dict[str, str] = {}  # module path → Gram key
        self.fired: set[str] = set()  # modules that ran in the current batch
        self.batch_rows = 0
        self._mask: torch.Tensor | None = None
        self._real: int | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GramCollector:
        for name, module in self.modules.items():
            if is_experts(module):  # a Gram per expert and projection, each over the tokens routed to it
                hook = ExpertsHook(name, self._add_expert, lambda x: row_mask(x, self._mask), self.experts)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
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
        self.fired.clear()
        self.batch_rows = 0

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
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
            self.fired.add(name)

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
        total = self.sums.get(key)
        if total is None:
            block = GRAM_BLOCK_CUDA if rows.is_cuda else GRAM_BLOCK
            total = self.sums[key] = GramSum(rows.shape[1], device=rows.device, block=block,
                                             staged=rows.dtype != torch.float64)
        total.add(rows, tokens)
        self.batch_rows = max(self.batch_rows, tokens)

    def _add_expert(self, key: str, rows: torch.Tensor) -> None:
        self._add(key, rows, rows.shape[0])
        self.gram_of[key] = key
        self.fired.add(key)

    def layers(self, layers: list[LinearLayer]) -> list[LinearLayer]:
        """The layers among `layers` that ran (and so have statistics)."""
        return [layer for layer in layers if layer.module in self.gram_of]


def gram_rounds(layers: list[LinearLayer], budget: int) -> list[list[LinearLayer]]:
    """A block's layers in the rounds their Grams are summed in, one forward pass of the block each: the
    first round every layer but the experts' and as many experts as fit in `budget` bytes of Grams, the
    next ones the other experts, as many as fit (one at least). A block without experts: one round."""
    experts: dict[tuple[str, int], list[LinearLayer]] = {}
    rounds: list[list[LinearLayer]] = [[]]
    for layer in layers:
        if layer.expert is None:
            rounds[0].append(layer)
        else:
            experts.setdefault((layer.experts, layer.expert), []).append(layer)
    used = 0
    for expert in experts.values():
        size = gram_bytes(expert)
        if used and used + size > budget:
            rounds.append([])
            used = 0
        rounds[-1] += expert
        used += size
    return rounds


def gram_bytes(layers: list[LinearLayer]) -> int:
    """The memory the Grams of `layers` take while they are summed (layers keyed alike share one)."""
    return sum(d * (d + 1) // 2 for d in {layer.module: layer.in_features for layer in layers}.values()) * ENTRY_BYTES


def expert_keys(layers: list[LinearLayer]) -> set[str]:
    """The Gram keys of the expert projections among `layers` (what a collector of them sums)."""
    return {layer.module for layer in layers if layer.expert is not None}
