"""The one place where library errors become one-line messages and exit codes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TypeVar

import typer

from mergecli.cli._console import emit_json, err_console, labelled, mode, set_mode
from mergecli.cli._hub import hub_message
from mergecli.errors import HubError, MergecliError, OutputInPlace, interrupted_exit_code

F = TypeVar("F", bound=Callable)


def debug_enabled() -> bool:
    return os.environ.get("MERGECLI_DEBUG", "") not in ("", "0", "false")


interruption_reported = False  # the running command said it was interrupted (for __main__)


def report_errors(command: F) -> F:
    """Run a command in the output mode its `--quiet` / `--json` options ask for; turn errors into
    `error: ...` (+ `hint: ...`) on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            set_mode(quiet=kwargs.get("quiet", False), json_output=kwargs.get("json_output", False))
            command(*args, **kwargs)
            emit_json()
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except MergecliError as exc:
            if debug_enabled():
                raise
            print_error(*(hub_message(exc) if isinstance(exc, HubError) else (exc.message, exc.hint)))
            raise typer.Exit(exc.exit_code) from None
        except OutputInPlace as done:
            err_console.print(f"interrupted once the output was complete: {done.output} is finished",
                              markup=False, highlight=False, soft_wrap=True)
            mode.payload.setdefault("output", str(done.output))
            emit_json()
            raise typer.Exit(0) from None
        except KeyboardInterrupt as interruption:
            if debug_enabled():
                raise
            global interruption_reported
            interruption_reported = True
            print_error("interrupted; nothing half-written was left behind "
                         "(inputs, existing outputs and finished statistics are untouched)")
            raise typer.Exit(interrupted_exit_code(interruption)) from None
        except OSError as exc:
            if debug_enabled():
                raise
            where = f": {exc.filename}" if exc.filename else ""
            print_error(f"{exc.strerror or exc}{where}", "nothing was written; fix the problem and rerun")
            raise typer.Exit(1) from None
        except Exception as exc:  # a bug: say so, briefly
            if debug_enabled():
                raise
            print_error(f"internal error: {type(exc).__name__}: {exc}",
                         "rerun with MERGECLI_DEBUG=1 for the traceback, and please report it")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_error(message: str, hint: str | None = None) -> None:
    err_console.print(labelled("error", "bold red", message), highlight=False, soft_wrap=True)
    if hint:
        err_console.print(labelled("hint", "yellow", hint), highlight=False, soft_wrap=True)
