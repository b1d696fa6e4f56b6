"""Rich consoles: results to stdout, progress / warnings / errors to stderr."""

from __future__ import annotations

import sys

from rich.console import Console

out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def interactive(quiet: bool) -> bool:
    """Animated progress only for a terminal, and not with --quiet."""
    return not quiet and sys.stderr.isatty()


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", markup=True, soft_wrap=True)


def info(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
