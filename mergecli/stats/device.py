"""Where models run: `--device cpu|cuda|cuda:N` checked once, for collect-stats and the merges alike."""

from __future__ import annotations

import os
import re

import torch

from mergecli.errors import UsageError


def resolve_device(name: str) -> str:
    """The torch device a `--device` value names: "cpu", or "cuda:N" (plain "cuda" is this process's
    GPU: LOCAL_RANK under torchrun, else 0).

    Raises:
        UsageError: not cpu / cuda / cuda:N, or no such CUDA device on this machine.
    """
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name.strip().lower())
    if match is None or (match.group(1) == "cpu" and match.group(2) not in (None, "0")):
        raise UsageError(f"--device {name}: expected cpu, cuda or cuda:N")
    if match.group(1) == "cpu":
        return "cpu"
    index = int(match.group(2) if match.group(2) is not None else os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        where = f"this machine has {count} CUDA device{'s' * (count != 1)}" if count else "no CUDA device is available"
        raise UsageError(f"--device {name}: {where}", hint="use --device cpu" if not count else None)
    return f"cuda:{index}"
