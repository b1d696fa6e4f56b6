"""Output directories written atomically: into a hidden temporary sibling, renamed into place only
when complete, so that an interrupted run never leaves a directory that looks finished.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergecli.errors import UsageError

_TEMPORARY = re.compile(r"\..+\.(partial|replaced)-\d+")


def check_output_path(output: Path, inputs: list[Path], *, force: bool) -> None:
    """Refuse an existing output without `force`, and any output that overlaps an input."""
    output = output.resolve()
    for path in inputs:
        path = path.resolve()
        if output == path or path in output.parents:
            raise UsageError(f"output {output} is inside the input {path}",
                             hint="choose an output directory outside every input")
        if output in path.parents:
            raise UsageError(f"input {path} is inside the output {output}",
                             hint="replacing the output would delete that input; choose another output")
    if output.exists() and not force:
        raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(output: Path) -> None:
    """Delete temporary siblings of `output` left by killed runs (their process is gone)."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)


def remove_dead_siblings(path: Path) -> None:
    """Delete the siblings of `path` named like it, `NAME-PID`, whose process is gone (scratch
    directories of killed runs)."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    if path.parent.is_dir():
        for stale in path.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_directory(output: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; rename it into place only if the block succeeds.

    On any failure (including Ctrl-C) the temporary directory is removed and an existing output
    is left untouched. A killed process leaves only a hidden `.NAME.partial-PID` directory.
    """
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(output)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    temporary.mkdir()
    try:
        yield temporary
        if output.exists():
            if not force:
                raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
            retired = output.parent / f".{output.name}.replaced-{os.getpid()}"
            os.rename(output, retired)
            os.rename(temporary, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def is_temporary(path: Path) -> bool:
    """Whether `path` is the hidden temporary sibling of an unfinished (or killed) run's output."""
    return _TEMPORARY.fullmatch(path.name) is not None
