"""Running the real CLI in-process (CliRunner) or as a subprocess (the console script)."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from mergecli.cli.app import app


def cli(*args: object):
    """Invoke `mergecli ARGS...` in-process; the result has exit_code, stdout, stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_process(*args: object, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m mergecli ARGS...` as a real process (stderr is not a terminal)."""
    return subprocess.run([sys.executable, "-m", "mergecli", *map(str, args)], capture_output=True,
                          text=True, env=env, **kwargs)
