"""Rich consoles and the output mode of a run: results to stdout (or one JSON object with --json),
progress / warnings / errors to stderr; --quiet leaves only errors.

No text is read as Rich markup (paths and names hold square brackets), and messages lose every escape
sequence and control character they carry (an error from torch or a server may hold ANSI colours):
the consoles style only what mergecli styles itself, with `Text`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

# Without a terminal there is no width to fit: lines (a table's rows, a long path) are never wrapped.
_WIDTH = {False: 100_000, True: None}
out_console = Console(highlight=False, soft_wrap=True, markup=False, width=_WIDTH[sys.stdout.isatty()])
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, width=_WIDTH[sys.stderr.isatty()])
# ANSI / VT escape sequences (CSI, OSC, and two-byte ones), then any other control character but \n and \t
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?|[\x00-\x08\x0b-\x1f\x7f]")


_BIDI = re.compile("[\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """`text` without escape sequences or control characters, and with the marks that reorder text
    (U+202E) written as escapes: what a message may show."""
    return _BIDI.sub(lambda m: f"\\u{ord(m.group()):04x}", _ESCAPES.sub("", str(text)))


def labelled(label: str, style: str, message: object) -> Text:
    """`label: message`, the label styled, the message as it is (cleaned, never markup)."""
    return Text.assemble((f"{label}:", style), " ", clean(message))


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
        err_console.print(labelled("warning", "yellow", message), soft_wrap=True)


def note(message: str) -> None:
    """Something expected but worth a word (a dropped buffer, a zero weight): not a warning."""
    if not mode.quiet:
        err_console.print(labelled("note", "cyan", message), soft_wrap=True)


def info(message: str) -> None:
    if not mode.quiet:
        err_console.print(clean(message), highlight=False, soft_wrap=True)


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
        out_console.print(clean(text), highlight=False, soft_wrap=True)


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 tensor`, `2 tensors`; `many` for an irregular plural ("Gram matrices")."""
    return f"{count} {word if count == 1 else many or word + 's'}"
