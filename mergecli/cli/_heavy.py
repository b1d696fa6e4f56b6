"""Importing torch safely: a KeyboardInterrupt raised while torch's C++ extension initializes
aborts the process (a C++ `terminate`), so Ctrl-C and SIGTERM are held for the import and acted
on right after it, as the one-line interruption every other moment gives."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

from mergecli.errors import Terminated


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Note SIGINT / SIGTERM instead of raising in the block; raise the first one after it."""
    pending: list[int] = []

    def remember(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        previous = {number: signal.signal(number, remember) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: nothing to defer
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if pending:
        raise Terminated if pending[0] == signal.SIGTERM else KeyboardInterrupt


def import_torch(*modules: str) -> None:
    """Import torch (once), and `modules` (a command's machinery, which loads numpy's, safetensors' and
    transformers' extensions: one interrupted while it initializes cannot be loaded again in the process),
    with signals deferred; the commands that compute call it first."""
    import importlib

    with signals_deferred():
        import torch  # noqa: F401

        for module in modules:
            importlib.import_module(module)
