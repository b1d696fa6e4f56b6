"""`python -m mergecli` and the `mergecli` command: signal handlers first, then the command line.

The handlers are installed before anything heavy is imported, so that Ctrl-C or SIGTERM at any
moment (even while torch loads) ends the run with one line and exit 130 (143 for SIGTERM), never a
traceback. torchrun runs this module too (`torchrun ... -m mergecli regmean collect-stats`).
"""

import os
import signal
import sys

from mergecli.errors import OutputInPlace, Terminated, interrupted_exit_code

_received: list[int] = []  # the signals that interrupted this run, in order


def _terminate(signum: int, frame: object) -> None:
    _received.append(signum)
    raise Terminated


def _interrupt(signum: int, frame: object) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _install_handlers() -> None:
    """Ours for SIGINT, then SIGTERM (a signal may land while they are being installed: the caller
    is ready for it)."""
    try:
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use)
        pass


def main() -> None:
    try:
        _install_handlers()
        from mergecli.cli.app import app

        app(prog_name="mergecli")
    except KeyboardInterrupt as interruption:  # before a command ran (or during its setup)
        _interrupted(interruption)
    except SystemExit as exit_:
        # typer turns an interruption outside a command (while it parses the command line) into a
        # silent exit 130, raised from the KeyboardInterrupt: say so, with the signal's own code.
        cause = getattr(exit_.__context__, "__cause__", None)
        if isinstance(cause, KeyboardInterrupt):
            _interrupted(cause)
        if exit_.code in (130, 143):
            errors = sys.modules.get("mergecli.cli._errors")
            if not getattr(errors, "interruption_reported", False):  # typer's own exit, from a signal
                # that met no handler of ours (a busy machine moves where it lands): say it, and
                # which signal it was
                sys.stderr.write("interrupted before anything was written\n")
                _exit_now(143 if _received and _received[-1] == signal.SIGTERM else 130)
            _exit_now(exit_.code)
        _ignore_signals()
        _exit_now(_exit_code(exit_))  # the run's work is done and durable; see _exit_now
    except Exception as error:  # an import that failed because a signal interrupted it
        interruption = _interruption_behind(error)
        if interruption is None:
            raise
        _interrupted(interruption)


def _ignore_signals() -> None:
    """The run is over and its result reported: ignore SIGINT and SIGTERM until the process exits.
    The interpreter puts the default action back for Python handlers while it shuts down (with
    torch loaded that takes a few hundred ms), and a signal then, to any thread, would kill a run
    that succeeded. An ignored signal is left ignored."""
    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(number, signal.SIG_IGN)
        except ValueError:  # not the main thread (embedded use)
            return


def _interruption_behind(error: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _interrupted(interruption: KeyboardInterrupt) -> None:
    if isinstance(interruption, OutputInPlace):
        sys.stderr.write(f"interrupted once the output was complete: {interruption.output}\n")
        _exit_now(0)
    sys.stderr.write("interrupted before anything was written\n")
    _exit_now(interrupted_exit_code(interruption))


def _exit_code(exit_: SystemExit) -> int:
    """The status `sys.exit(code)` would give: 0 for None, a message's 1 (written to stderr)."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    sys.stderr.write(f"{exit_.code}\n")
    return 1


def _exit_now(code: int) -> None:
    """End the run with `code`, skipping interpreter finalization. Its cleanup is done by now (its
    `finally` blocks ran, the output is synced and in place), and finalization only undoes imports:
    with torch loaded it takes half a second, which every run would wait for (a pipeline of several
    mergecli calls, several halves). And for an interrupted run: CPython 3.11 flags a
    KeyboardInterrupt raised inside exec'd code (while a dataclass is built, say) as unhandled even
    after it was caught, and would then end the process by SIGINT instead of with this code."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a closed stream
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
