"""`python -m mergecli` and the `mergecli` command: signal handlers first, then the command line.

The handlers are installed before anything heavy is imported, so that Ctrl-C or SIGTERM at any
moment (even while torch loads) ends the run with one line and exit 130 (143 for SIGTERM), never a
traceback. torchrun runs this module too (`torchrun ... -m mergecli regmean collect-stats`).
"""

import signal
import sys

from mergecli.errors import OutputInPlace, Terminated, interrupted_exit_code


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use)
        pass
    try:
        from mergecli.cli.app import app

        app()
    except KeyboardInterrupt as interruption:  # before a command ran (or during its setup)
        _interrupted(interruption)
    except SystemExit as exit_:
        # typer turns an interruption outside a command (while it parses the command line) into a
        # silent exit 130, raised from the KeyboardInterrupt: say so, with the signal's own code.
        cause = getattr(exit_.__context__, "__cause__", None)
        if isinstance(cause, KeyboardInterrupt):
            _interrupted(cause)
        raise


def _interrupted(interruption: KeyboardInterrupt) -> None:
    if isinstance(interruption, OutputInPlace):
        sys.stderr.write(f"interrupted once the output was complete: {interruption.output}\n")
        sys.exit(0)
    sys.stderr.write("interrupted before anything was written\n")
    sys.exit(interrupted_exit_code(interruption))


if __name__ == "__main__":
    main()
