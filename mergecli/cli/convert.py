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
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="RECIPE", help="Write the recipe here (its relative paths rewritten for its "
                                                 "folder) instead of printing it.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing RECIPE file.")] = False,
) -> None:
    """Print the mergecli recipe of a mergekit config (its methods: `mergecli merge --help`). The
    recipe is validated like any recipe first: a problem is said with the config's key and line. A
    feature mergecli does not have is refused by name, never dropped.

    Relative paths are read from the current directory, as mergekit reads them; with -o they are
    rewritten for the recipe's folder (a recipe's paths are relative to its own file).

    Examples:

    \b
      mergecli convert mergekit.yml -o recipes/merge.toml
      mergecli convert mergekit.yml > recipe.toml
      mergecli convert mergekit.yml > recipe.toml && mergecli merge recipe.toml -o merged/
      mergecli merge mergekit.yml -o merged/        # or run the config as it is
    """
    from mergecli.merge.configs import read_config, rebased, write_recipe
    from mergecli.methods.registry import method_of
    from mergecli.recipe.convert import check, recipe_text

    converted = read_config(config)
    method_of(check(converted, base_dir=Path.cwd()))  # every key, the method's own too, as a recipe's
    if output is None:
        say(recipe_text(converted, source=config.name).rstrip("\n"))
        return
    write_recipe(output, recipe_text(rebased(converted, output.parent), source=config.name), force=force)
    say(f"{output}: the recipe of {config.name} (its paths relative to its folder)")
