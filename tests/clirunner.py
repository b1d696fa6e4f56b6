"""Running the real CLI in-process (CliRunner) or as a subprocess (the console script)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mergecli.cli.app import app


def cli(*args: object):
    """Invoke `mergecli ARGS...` in-process; the result has exit_code, stdout, stderr."""
    return CliRunner().invoke(app, [str(a) for a in args])


def cli_process(*args: object, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m mergecli ARGS...` as a real process (stderr is not a terminal)."""
    return subprocess.run([sys.executable, "-m", "mergecli", *map(str, args)], capture_output=True,
                          text=True, env=env, **kwargs)


def merge_recipe(directory: Path, method: str, models: list[Path], *, base: Path | None = None,
                 dtype: str = "float32", table: str = "", weights: list[float] | None = None) -> Path:
    """Write a recipe of `method` over `models` (named m0, m1, ...) into `directory`, merge it with the CLI
    into `directory / "out"`, and return that output (the merge must succeed)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'method = "{method}"', f'output = "{directory / "out"}"', f'dtype = "{dtype}"']
    if base is not None:
        lines += ["[base]", f'path = "{base}"']
    if table:
        lines += [f"[{method}]", table]
    for i, path in enumerate(models):
        lines += ["[[models]]", f'path = "{path}"', f'name = "m{i}"', f"weight = {(weights or [1.0] * len(models))[i]}"]
    (directory / "recipe.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", directory / "recipe.toml", "--force")
    assert result.exit_code == 0, result.output
    return directory / "out"
