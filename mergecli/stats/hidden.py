"""Calibration hidden states kept between blocks: in memory up to a budget, beyond it in a spill
file on disk (written and read back with pwrite / pread), removed when no longer needed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.io.safetensors import pread_into, pwrite_all, tensor_bytes


@dataclass
class MemoryBudget:
    """Bytes of hidden states that may stay in memory, shared by every store drawing on it; beyond
    them, stores spill into files of `spill_dir` (created when first needed, removed by `close`)."""

    limit: int
    spill_dir: Path
    used: int = 0
    spilled: int = 0  # bytes written to spill files, ever
    _created: bool = False

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes` of memory, if the budget has them."""
        if self.used + nbytes > self.limit:
            return False
        self.used += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes

    def spill_file(self, name: str) -> Path:
        if not self._created:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._created = True
        return self.spill_dir / name

    def close(self) -> None:
        if self._created:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self._created = False


@dataclass
class HiddenStates:
    """One tensor per calibration batch (a block's inputs or outputs), in memory or spilled."""

    budget: MemoryBudget
    name: str
    _memory: dict[int, torch.Tensor] = field(default_factory=dict)
    _spilled: dict[int, tuple[int, torch.dtype, tuple[int, ...], torch.device]] = field(default_factory=dict)
    _fd: int | None = None
    _path: Path | None = None
    _end: int = 0

    def put(self, batch: int, tensor: torch.Tensor) -> None:
        """Keep `tensor` as batch `batch`'s (the caller must not modify it afterwards)."""
        if self.budget.take(tensor.nbytes):
            self._memory[batch] = tensor
            return
        if self._fd is None:
            self._path = self.budget.spill_file(f"{self.name}.bin")
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        pwrite_all(self._fd, tensor_bytes(tensor.detach().cpu()), self._end)
        self._spilled[batch] = (self._end, tensor.dtype, tuple(tensor.shape), tensor.device)
        self._end += tensor.nbytes
        self.budget.spilled += tensor.nbytes

    def get(self, batch: int) -> torch.Tensor:
        if batch in self._memory:
            return self._memory[batch]
        offset, dtype, shape, device = self._spilled[batch]
        out = torch.empty(shape, dtype=dtype)
        pread_into(self._fd, out, offset, path=self._path)
        return out.to(device)

    def __len__(self) -> int:
        return len(self._memory) + len(self._spilled)

    def close(self) -> None:
        """Free the memory and remove the spill file."""
        self.budget.give_back(sum(t.nbytes for t in self._memory.values()))
        self._memory.clear()
        self._spilled.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._path.unlink(missing_ok=True)
            self._fd = None
