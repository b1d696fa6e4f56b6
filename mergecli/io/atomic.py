"""Output directories written atomically: into a hidden temporary sibling, put in place only when
complete, so that an interrupted run never leaves a directory that looks finished, and never loses
the output it was replacing.

An existing output is replaced only when `--force` is given and it is an empty directory or one
this tool wrote (a merge output, a statistics directory). On Linux the new directory is swapped
with the old one by one `renameat2(RENAME_EXCHANGE)`: at no moment is neither in place. Elsewhere
the old one is first renamed to `.NAME.replaced-PID`, a record the next run uses to restore it.
Each run first restores or removes what killed runs left (`.NAME.partial-PID`, `.NAME.replaced-PID`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergecli.errors import OutputInPlace, UsageError
from mergecli.io.linux import exchange as _exchange

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TEMPORARY = re.compile(r"\..+\.(partial|replaced)-\d+")
Replaceable = Callable[[Path], "str | None"]  # why an existing directory may not be replaced, or None


def finished_output(path: Path) -> str | None:
    """None when `path` may be replaced by a merge: empty, or a finished mergecli output."""
    if not any(path.iterdir()):
        return None
    recipe = path / "mergecli.toml"
    if not recipe.is_file():
        return "it is not a mergecli output (it has no mergecli.toml)"
    try:
        written = tomllib.loads(recipe.read_text(encoding="utf-8")).get("output") == "."
    except (OSError, ValueError):
        written = False
    if not written:  # a recipe of the user's own, not the resolved recipe a merge writes
        return "its mergecli.toml is a recipe, not the record of a merge (which says output = \".\")"
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from an earlier call of this process: nobody uses it any more
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(output: Path, kind: str) -> list[Path]:
    """`.NAME.KIND-PID` beside `output` whose process is gone (a prefix test per entry: a glob
    would fnmatch every name of a crowded directory such as /tmp)."""
    prefix, found = f".{output.name}.{kind}-", []
    try:
        entries = list(os.scandir(output.parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        pid = entry.name[len(prefix):]
        if entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            found.append(Path(entry.path))
    return sorted(found)


def recover(output: Path) -> list[str]:
    """Restore or remove what killed runs left beside `output`; say what was done.

    A `.replaced-PID` directory is an earlier output moved aside by a replacement that did not
    finish: put back if `output` is missing, else removed. A `.partial-PID` directory is never
    complete as far as anyone can tell: removed.
    """
    notes = []
    for replaced in _leftovers(output, "replaced"):
        if not output.exists():
            os.rename(replaced, output)
            notes.append(f"restored {output}, which an interrupted replacement had moved aside to {replaced.name}")
        else:
            shutil.rmtree(replaced, ignore_errors=True)
            notes.append(f"removed {replaced.name}, the previous output left by an interrupted replacement")
    for partial in _leftovers(output, "partial"):
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed {partial.name}, left by an interrupted run")
    return notes


def remove_dead_siblings(path: Path) -> None:
    """Delete the siblings of `path` named like it, `NAME-PID`, whose process is gone (scratch
    directories of killed runs)."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    if path.parent.is_dir():
        for stale in path.parent.glob(f"{prefix}*"):
            pid = stale.name[len(prefix):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)


def is_temporary(path: Path) -> bool:
    """Whether `path` is the hidden temporary sibling of an unfinished (or killed) run's output."""
    return _TEMPORARY.fullmatch(path.name) is not None


def check_output_path(output: Path, inputs: list[Path], *, force: bool,
                      replaceable: Replaceable = finished_output) -> None:
    """Refuse an existing output without `force`, one that `--force` may not replace, and any
    output that overlaps an input."""
    output = Path(os.path.abspath(output))
    for path in inputs:
        path = Path(os.path.abspath(path))
        if output == path:
            raise UsageError(f"output {output} is one of the inputs",
                             hint="choose an output directory outside every input")
        if path in output.parents:
            raise UsageError(f"output {output} is inside the input {path}",
                             hint="choose an output directory outside every input")
        if output in path.parents:
            raise UsageError(f"input {path} is inside the output {output}",
                             hint="replacing the output would delete that input; choose another output")
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UsageError(f"output {output} exists and is not a directory", hint="choose another output")
    _check_writable_parent(output)
    if output.exists():
        if not force:
            raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
        reason = replaceable(output)
        if reason:
            raise UsageError(f"--force does not replace {output}: {reason}",
                             hint="--force replaces only an empty directory or an earlier output of mergecli; "
                                  "choose another output, or remove that directory yourself")


def _check_writable_parent(output: Path) -> None:
    """The output's nearest existing ancestor must be a directory this process may write in, on a
    writable file system that stores files."""
    ancestor = next(p for p in output.parents if os.path.lexists(p))
    problem = None
    if not ancestor.is_dir():
        problem = f"{ancestor} is a file, not a directory"
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        problem = f"no permission to write in {ancestor}"
    else:
        stats = os.statvfs(ancestor)
        if stats.f_flag & os.ST_RDONLY:
            problem = f"{ancestor} is on a read-only file system"
        elif stats.f_blocks == 0:
            problem = f"{ancestor} is on a virtual file system, which cannot hold files"
    if problem:
        raise UsageError(f"cannot create output {output}: {problem}", hint="choose another output directory")


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while the output is swapped: once started, the swap completes."""
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (ValueError, OSError, AttributeError):  # not the main thread, or no such call
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _put_in_place(temporary: Path, output: Path) -> None:
    if not output.exists():
        os.rename(temporary, output)
        return
    if _exchange(temporary, output):
        shutil.rmtree(temporary)  # the old output, now in the temporary's place
        return
    retired = output.parent / f".{output.name}.replaced-{os.getpid()}"
    os.rename(output, retired)  # a kill here: the next run restores `retired`
    os.rename(temporary, output)
    shutil.rmtree(retired)


@contextmanager
def atomic_directory(output: Path, *, force: bool = False, replaceable: Replaceable = finished_output,
                     notes: list[str] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; put it in place only if the block succeeds.

    Args:
        force: replace an existing `output`, if `replaceable` says it may be.
        notes: where to say what was recovered from killed runs.

    On any failure (including Ctrl-C) the temporary directory is removed and an existing output is
    left untouched. A killed process leaves only hidden `.NAME.partial-PID` (and, on systems
    without an atomic exchange, `.NAME.replaced-PID`) directories, which the next run handles.
    Ctrl-C and SIGTERM wait while the output is put in place; one that came then raises
    `OutputInPlace`: the directory is complete.
    """
    output = Path(os.path.abspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    recovered = recover(output)
    if notes is not None:
        notes.extend(recovered)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    temporary.mkdir()
    placed = False
    try:
        yield temporary
        with _signals_held():
            check_output_path(output, [], force=force, replaceable=replaceable)
            _put_in_place(temporary, output)
            placed = True
    except KeyboardInterrupt as interruption:
        if placed:  # the signal came while the output was being put in place: it is complete
            raise OutputInPlace(output) from interruption
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
