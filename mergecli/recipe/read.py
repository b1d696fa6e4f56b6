"""Reading a recipe file: a TOML recipe, or a mergekit YAML config run as it is (translated by
convert.py, its relative paths read from the current directory, as mergekit reads them)."""

from __future__ import annotations

from pathlib import Path

from mergecli.recipe.convert import check, read_config
from mergecli.recipe.load import load_toml
from mergecli.recipe.schema import Recipe

YAML_SUFFIXES = (".yml", ".yaml")


def load_recipe(path: str | Path, *, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe: TOML, or a mergekit YAML config.

    Args:
        path: the recipe file (`.toml`), or a mergekit config (`.yml` / `.yaml`).
        overrides: `key.path=value` strings applied before validation (recipe keys, also for a
            mergekit config: they apply to its translation).

    Returns:
        The validated, frozen `Recipe`, with local paths made absolute (a TOML recipe's relative to
        its file, a mergekit config's relative to the current directory).

    Raises:
        RecipeError: unreadable file, invalid TOML or YAML, or invalid keys, one line per problem.

    Example:
        >>> recipe = load_recipe("recipes/demo-average.toml", overrides=["normalize=false"])
    """
    path = Path(path)
    if path.suffix.lower() not in YAML_SUFFIXES:
        return load_toml(path, overrides=overrides)
    return check(read_config(path), base_dir=Path.cwd(), overrides=overrides)
