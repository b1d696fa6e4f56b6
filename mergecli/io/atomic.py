"""Output directories written atomically: into a hidden temporary sibling, synced to disk and put in
place only when complete, so that an interrupted run (or a power loss) never leaves a directory that
looks finished, and never loses the output it was replacing.

An existing output is replaced only when `--force` is given and it holds only what mergecli wrote
there (io/manifest.py). On Linux the new directory is swapped with the old one by one
`renameat2(RENAME_EXCHANGE)`: at no moment is neither in place. Elsewhere the old one is first
renamed to `.NAME.replaced-PID`, a record the next run uses to restore it. Ctrl-C and SIGTERM wait
while the output is swapped: once the swap starts, it completes. Each run first restores or removes
what killed runs left (`.NAME.partial-PID`, `.NAME.replaced-PID`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergecli.errors import OutputInPlace, UsageError
from mergecli.io.durable import sync_directory, sync_tree
from mergecli.io.files import SAFETENSORS_INDEX, SINGLE_SAFETENSORS, TOKENIZER_FILES
from mergecli.io.linux import exchange as _exchange
from mergecli.io.manifest import MANIFEST, foreign_file, write_manifest
from mergecli.io.resume import RESUME_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_TEMPORARY = re.compile(r"\..+\.(partial|replaced)-\d+")
MERGE_OUTPUT, STATISTICS = "merge output", "statistics"
# What a directory of each kind written before manifests existed may hold (file name patterns).
_LEGACY = {MERGE_OUTPUT: (SINGLE_SAFETENSORS, "model-*-of-*.safetensors", SAFETENSORS_INDEX, "config.json",
                          "README.md", "mergecli.toml", *TOKENIZER_FILES),
           STATISTICS: ("stats.json", "grams-*.safetensors")}


def replace_problem(path: Path, kind: str) -> str | None:
    """Why `--force` may not replace the directory `path` by a new `kind` directory, or None."""
    problem = foreign_file(path, kind, legacy=_LEGACY[kind])
    if problem or kind != MERGE_OUTPUT or (path / MANIFEST).exists() or not any(path.iterdir()):
        return problem
    try:  # a merge output from before manifests: its mergecli.toml is the record of a merge
        written = tomllib.loads((path / "mergecli.toml").read_text(encoding="utf-8")).get("output") == "."
    except (OSError, ValueError, RecursionError):
        written = False
    return None if written else "it has no record of a merge (mergecli.toml with output = \".\")"


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


def _dead(directory: Path, prefix: str) -> list[Path]:
    """Entries `PREFIX<pid>` of `directory` whose process is gone (a prefix test per entry: a glob
    would fnmatch every name of a crowded directory such as /tmp)."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        pid = entry.name[len(prefix):]
        if entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            found.append(Path(entry.path))
    return sorted(found)


def resumable(output: Path) -> Path | None:
    """The newest temporary directory a killed merge of `output` left with a resume record (io/resume.py)."""
    found = [p for p in _dead(output.parent, f".{output.name}.partial-") if (p / RESUME_FILE).is_file()]
    return max(found, key=lambda p: (p / RESUME_FILE).stat().st_mtime, default=None)


def recover(output: Path, *, keep: Path | None = None) -> list[str]:
    """Restore or remove what killed runs left beside `output`; say what was done.

    A `.replaced-PID` directory is an earlier output moved aside by a replacement that did not
    finish: put back if `output` is missing, else removed. A `.partial-PID` directory is never
    complete as far as anyone can tell: removed.
    """
    notes = []
    for replaced in _dead(output.parent, f".{output.name}.replaced-"):
        if not os.path.lexists(output):
            os.rename(replaced, output)
            notes.append(f"restored {output}, which an interrupted replacement had moved aside to {replaced.name}")
        else:
            shutil.rmtree(replaced, ignore_errors=True)
            notes.append(f"removed {replaced.name}, the previous output left by an interrupted replacement")
    for partial in _dead(output.parent, f".{output.name}.partial-"):
        if partial == keep:  # a merge resumes from it (`--resume`)
            continue
        shutil.rmtree(partial, ignore_errors=True)
        notes.append(f"removed {partial.name}, left by an interrupted run")
    return notes


SCRATCH = (".plusplus-", ".spill-")  # `.KIND-PID` scratch directories that runs make under stats_dir


def scratch_directory(directory: Path, kind: str) -> Path:
    """This process's scratch directory of `kind` ("plusplus", "spill") under `directory`."""
    return directory / f".{kind}-{os.getpid()}"


def clean_directory(directory: Path) -> list[str]:
    """Remove what dead runs of any kind left in `directory` (scratch directories, partial outputs)
    and restore what an interrupted replacement moved aside; say what was done."""
    notes = []
    for prefix in SCRATCH:
        for stale in _dead(directory, prefix):
            shutil.rmtree(stale, ignore_errors=True)
            notes.append(f"removed {stale}, left by an interrupted run")
    try:
        names = {match.group(1) for entry in os.scandir(directory)
                 if (match := re.fullmatch(r"\.(.+)\.(?:partial|replaced)-\d+", entry.name))}
    except (FileNotFoundError, NotADirectoryError):
        return notes
    for name in sorted(names):
        notes += recover(directory / name)
    return notes


def is_temporary(path: Path) -> bool:
    """Whether `path` is the hidden temporary sibling of an unfinished (or killed) run's output."""
    return _TEMPORARY.fullmatch(path.name) is not None


def _overlap(output: Path, path: Path) -> str | None:
    """How `output` and the input `path` overlap (symlinks resolved on both sides), or None."""
    real_output, real = Path(os.path.realpath(output)), Path(os.path.realpath(path))
    through = f" (through links: it is {real})" if real != Path(os.path.abspath(path)) else ""
    if real_output == real:
        return f"output {output} is one of the inputs{through}"
    if real in real_output.parents:
        return f"output {output} is inside the input {path}{through}"
    if real_output in real.parents:
        return f"the input {path}{through} is inside the output {output}; replacing the output would delete it"
    return None


def output_directory(target: Path | str | None) -> Path:
    """The output directory given (`-o`, else the recipe's `output`), absolute; a link is not followed
    (check_output_path refuses it)."""
    if target is None:
        raise UsageError("no output directory", hint="set `output` in the recipe or pass -o DIR")
    return Path(os.path.abspath(Path(target).expanduser()))


def check_output_path(output: Path, inputs: list[Path], *, force: bool, kind: str = MERGE_OUTPUT) -> None:
    """Refuse an output that is a link, one that exists (without `force`), one that `--force` may not
    replace (it holds files mergecli did not write), and any output that overlaps an input, symlinks
    resolved on both sides."""
    output = Path(os.path.abspath(output))
    if os.path.islink(output):
        raise UsageError(f"output {output} is a symbolic link (to {os.readlink(output)})",
                         hint="give the directory itself: mergecli does not write through links")
    for path in inputs:
        problem = _overlap(output, path)
        if problem:
            raise UsageError(problem, hint="choose an output directory outside every input")
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} exists and is not a directory", hint="choose another output")
    _check_writable_parent(output)
    if output.exists():
        reason = replace_problem(output, kind)
        if not force and reason:
            raise UsageError(f"output {output} already exists, and is not a {kind} of mergecli: {reason}",
                             hint="choose another output (--force would not replace it either)")
        if not force:
            raise UsageError(f"output {output} already exists", hint="pass --force to replace it")
        if reason:
            raise UsageError(f"--force does not replace {output}: {reason}",
                             hint=f"--force replaces only an empty directory or what mergecli wrote as a {kind}; "
                                  "choose another output, or remove that directory yourself")


def _check_writable_parent(output: Path) -> None:
    """The output's nearest existing ancestor must be a directory this process may write in, on a
    writable file system that stores files."""
    ancestor = next(p for p in output.parents if os.path.lexists(p))
    problem = None
    if not ancestor.is_dir():
        problem = f"{ancestor} is a file, not a directory"
    elif os.statvfs(ancestor).f_flag & os.ST_RDONLY:
        problem = f"{ancestor} is on a read-only file system"
    elif os.statvfs(ancestor).f_blocks == 0:
        problem = f"{ancestor} is on a virtual file system, which cannot hold files"
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        problem = f"no permission to write in {ancestor}"
    if problem:
        raise UsageError(f"cannot create output {output}: {problem}", hint="choose another output directory")


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM for a moment that must not be cut: their Python handlers (which run on
    the main thread, whichever thread the signal reached) only note them, in the list yielded; the
    caller acts on them afterwards. Outside the main thread nothing can be held."""
    pending: list[int] = []

    def remember(signum: int, frame: object) -> None:
        pending.append(signum)

    try:
        previous = {number: signal.signal(number, remember) for number in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield pending
        return
    try:
        yield pending
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _put_in_place(temporary: Path, output: Path, *, sync: bool) -> Path | None:
    """Rename `temporary` to `output`, swapping out an existing one; the parent is synced after the
    rename (`sync`). Returns the old output's new place, for the caller to delete (None when there
    was none)."""
    if not os.path.lexists(output):
        os.rename(temporary, output)
        old = None
    elif _exchange(temporary, output):
        old = temporary  # the old output, now in the temporary's place
    else:
        old = output.parent / f".{output.name}.replaced-{os.getpid()}"
        os.rename(output, old)  # a kill here: the next run restores `old`
        os.rename(temporary, output)
    if sync:
        sync_directory(output.parent)
    return old


def partial_directory(output: Path) -> Path:
    """The temporary sibling this process writes `output` into (`.NAME.partial-PID`), before the rename."""
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.partial-{os.getpid()}"


@contextmanager
def atomic_directory(output: Path, *, force: bool = False, kind: str = MERGE_OUTPUT,
                     notes: list[str] | None = None, sync: bool = True, adopt: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `output`; put it in place only if the block succeeds.

    Args:
        force: replace an existing `output`, if it holds only what mergecli wrote as a `kind`.
        notes: where to say what was recovered from killed runs.
        sync: every file and the directory reach the disk before the rename that publishes them,
            and the parent after it (the default); False for scratch outputs: nothing is synced.
        adopt: a killed run's temporary directory to carry on in (`--resume`), renamed to this run's.

    On any failure (including Ctrl-C) the temporary directory is removed and an existing output is
    left untouched. A killed process leaves only hidden `.NAME.partial-PID` (and, on systems
    without an atomic exchange, `.NAME.replaced-PID`) directories, which the next run handles.
    Ctrl-C and SIGTERM wait while the output is swapped; one that came then raises `OutputInPlace`:
    the directory is complete.
    """
    output = Path(os.path.abspath(output))
    output.parent.mkdir(parents=True, exist_ok=True)
    recovered = recover(output, keep=adopt)
    if notes is not None:
        notes.extend(recovered)
    temporary = partial_directory(output)
    old = None
    try:  # from its creation on: a signal right after the mkdir must remove it too
        if adopt is not None:
            os.rename(adopt, temporary)
        else:
            temporary.mkdir()
        yield temporary
        write_manifest(temporary, kind)
        if sync:
            sync_tree(temporary)
        with signals_deferred() as pending:
            check_output_path(output, [], force=force, kind=kind)
            old = _put_in_place(temporary, output, sync=sync)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        if old is not None:
            shutil.rmtree(old)
    except KeyboardInterrupt as interruption:  # the next run removes what is left of the old output
        raise OutputInPlace(output) from interruption
    if pending:
        raise OutputInPlace(output)
