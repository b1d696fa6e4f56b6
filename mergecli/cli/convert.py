"""`mergecli convert`: a mergekit config as a mergecli recipe, on stdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._console import say
from mergecli.cli._errors import report_errors


@report_errors
def convert(
    config: Annotated[Path, typer.Argument(metavar="MERGEKIT_YML", help="A mergekit config (YAML).",
                                           show_default=False)],
) -> None:
    """Print the mergecli recipe of a mergekit config (linear, task_arithmetic, ties, dare_linear,
    dare_ties, slerp). A feature mergecli does not have is refused by name, never dropped.

    Examples:

    \b
      mergecli convert mergekit.yml > recipe.toml
      mergecli convert mergekit.yml > recipe.toml && mergecli merge recipe.toml -o merged/
    """
    from mergecli.recipe.convert import convert_mergekit, load_mergekit

    say(convert_mergekit(load_mergekit(config), source=str(config)).rstrip("\n"))
