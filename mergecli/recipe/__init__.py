"""Recipes: the TOML schema (schema.py), loading with `--set` overrides (load.py), and the resolved
recipe written into every output (dump.py)."""

from mergecli.recipe.dump import dump_recipe
from mergecli.recipe.load import apply_overrides, load_recipe, recipe_from_data, resolve_local
from mergecli.recipe.schema import (
    HEAD_PATTERNS,
    METHOD_TABLES,
    BaseSpec,
    ModelSpec,
    PushSettings,
    Recipe,
    RegMeanSettings,
    parse_size,
    scaled_weights,
)

__all__ = ["HEAD_PATTERNS", "METHOD_TABLES", "BaseSpec", "ModelSpec", "PushSettings", "Recipe", "RegMeanSettings",
           "apply_overrides", "dump_recipe", "load_recipe", "parse_size", "recipe_from_data", "resolve_local",
           "scaled_weights"]
