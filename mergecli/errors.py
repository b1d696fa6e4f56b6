"""Typed errors. The library raises these with fields; the CLI words them (cli/_errors.py).

Exit codes follow the spec: 2 means "fix your command or recipe", 1 means "the inputs or the
machine failed the merge".
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

# characters that would break a message's line or reorder what a terminal shows: control characters,
# line and paragraph separators, and the bidirectional marks and overrides (U+202E turns text around)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown(text: object) -> str:
    """A name (a tensor's, a file's) as a message shows it: as it is, or, when it holds a character
    that would break the line or turn the text around, as `repr` writes it (escapes visible)."""
    text = str(text)
    return repr(text) if _UNSAFE.search(text) else text


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (`a FIFO (named pipe)`), from its `st_mode`."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISREG, "a regular file"))
    return next((words for test, words in kinds if test(mode)), "not a regular file")


class MergecliError(Exception):
    """Base class; `exit_code` is what the CLI exits with, `hint` says what to do."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interruption that cleans up like Ctrl-C (exit 143 instead of 130)."""


class OutputInPlace(KeyboardInterrupt):
    """An interruption that came once the output was complete and in place: the run succeeded."""

    def __init__(self, output: Path | str):
        super().__init__(str(output))
        self.output = Path(output)


def interrupted_exit_code(interruption: KeyboardInterrupt) -> int:
    """0 once the output was in place; else 143 for SIGTERM, 130 for Ctrl-C."""
    if isinstance(interruption, OutputInPlace):
        return 0
    return 143 if isinstance(interruption, Terminated) else 130


class UsageError(MergecliError):
    """Bad flags or arguments, or an output that would be clobbered."""

    exit_code = 2


class RecipeError(UsageError):
    """The recipe does not validate; `problems` holds one line per bad key."""

    def __init__(self, source: str, problems: list[str], *, hint: str | None = None):
        self.source = source
        self.problems = problems
        # a problem with a `--set` key names the flag, not the file it did not come from
        super().__init__("\n".join(p if p.startswith("--set ") else f"{source}: {p}" for p in problems), hint=hint)


class InputNotFoundError(UsageError):
    """A model path that is neither a local checkpoint nor a resolvable hub repo."""

    def __init__(self, path: str, *, hint: str | None = None):
        self.path = path
        super().__init__(f"{path}: no such file or directory", hint=hint)


class CheckpointError(MergecliError):
    """A checkpoint that cannot be read: corrupt, truncated, unsupported format."""

    def __init__(self, path: Path | str, problem: str, *, hint: str | None = None):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{shown(path)}: {problem}", hint=hint)


class ShapeMismatchError(MergecliError):
    """Inputs disagree on tensor names or shapes; `problems` lists every mismatch, `architectures`
    says so first when the inputs are different models altogether."""

    def __init__(self, problems: list[str], *, architectures: str | None = None, hint: str | None = None):
        self.problems = problems
        count = f"{len(problems)} mismatch{'es' if len(problems) != 1 else ''}"
        if architectures:
            message = f"the inputs are different architectures: {architectures} ({count} in their tensors)"
        else:
            shown = problems[:20]
            more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
            message = (f"the inputs do not have the same tensors ({count}):\n"
                       + "\n".join(f"  {p}" for p in shown) + more)
        super().__init__(message, hint=hint or "merge only checkpoints of the same architecture and vocabulary size")


class NonFiniteError(MergecliError):
    """NaN or inf in an input tensor, or in a merged one (an overflow)."""

    def __init__(self, message: str, *, tensor: str):
        self.tensor = tensor
        super().__init__(message, hint="fix or exclude that tensor; `allow_non_finite = true` in the recipe "
                                       "merges it anyway")


class StatsError(MergecliError):
    """RegMean statistics that are missing, stale, from another model or corrupt."""


class HubError(MergecliError):
    """The Hugging Face Hub refused or could not be reached (network, server error, cache).

    `problem` says what happened in a word (`gated`, `repo-not-found`, `unreachable`, ...: the CLI
    words each, cli/_hub.py); the fields hold the facts, never a token.
    """

    def __init__(self, problem: str, *, repo_id: str | None = None, revision: str | None = None,
                 status: int | None = None, detail: str = "", writing: bool = False, token: bool = False,
                 endpoint: str = "", files: tuple[str, ...] = ()):
        self.problem = problem
        self.repo_id = repo_id
        self.revision = revision
        self.status = status  # the HTTP status, when the hub answered
        self.detail = detail  # what the server or the network said (token-free)
        self.writing = writing  # a push, not a download
        self.token = token  # a token was sent
        self.endpoint = endpoint
        self.files = files  # the files concerned (missing from a cached snapshot, ...)
        self.local_path_tried = False  # the repo id was first looked for as a local path
        what = f"{repo_id}: " if repo_id else ""
        super().__init__(f"{what}{problem.replace('-', ' ')}{f' ({detail})' if detail else ''}")


class HubNotFoundError(HubError):
    """The repo or the revision a recipe names does not exist (or is invisible to the token)."""

    exit_code = 2


class HubAccessError(HubError):
    """Gated repo, missing or rejected token, token without write access."""

    exit_code = 2
