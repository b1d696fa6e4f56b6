"""Rich consoles and the output mode of a run: results to stdout (or one JSON object with --json),
progress / warnings / errors to stderr; --quiet leaves only errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

out_console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Mode:
    quiet: bool = False  # errors only
    json: bool = False  # stdout holds one JSON object, the result
    payload: dict[str, Any] = field(default_factory=dict)  # that object, filled as the command goes


mode = Mode()


def set_mode(*, quiet: bool = False, json_output: bool = False) -> None:
    """Set this command's output mode; silence libraries' progress bars unless stderr is a terminal
    we may draw on."""
    mode.quiet, mode.json, mode.payload = quiet, json_output, {}
    if quiet or not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars  # light: no torch

        disable_progress_bars()


def interactive() -> bool:
    """Animated progress only for a terminal, and not with --quiet."""
    return not mode.quiet and sys.stderr.isatty()


def warn(message: str) -> None:
    if not mode.quiet:
        err_console.print(f"[yellow]warning:[/] {message}", markup=True, soft_wrap=True)


def info(message: str) -> None:
    if not mode.quiet:
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def result(data: dict[str, Any], human: Callable[[], None], *, key: str | None = None) -> None:
    """A command's result: `human()` unless --quiet; with --json, `data` goes into the one JSON
    object printed when the command ends (under `key` when given: a merge's `push`)."""
    if mode.json:
        mode.payload.update({key: data} if key else data)
    elif not mode.quiet:
        human()


def emit_json() -> None:
    """Print the --json object of a command that succeeded."""
    if mode.json:
        sys.stdout.write(json.dumps(mode.payload) + "\n")
        sys.stdout.flush()


def say(text: str) -> None:
    """A line of a command's human result on stdout (not with --quiet or --json)."""
    if not (mode.quiet or mode.json):
        out_console.print(text, markup=False, highlight=False, soft_wrap=True)


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 tensor`, `2 tensors`; `many` for an irregular plural ("Gram matrices")."""
    return f"{count} {word if count == 1 else many or word + 's'}"
