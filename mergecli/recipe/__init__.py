"""Recipes: the TOML schema (schema.py), loading with `--set` overrides (load.py), and the resolved
recipe written into every output (dump.py)."""

from mergecli.recipe.dump import dump_recipe
from mergecli.recipe.load import (
    apply_overrides,
    format_key,
    load_toml,
    recipe_from_data,
    resolve_local,
    unknown_key,
    validation_problems,
)
from mergecli.recipe.names import WEIGHT_SUFFIXES
from mergecli.recipe.schema import (
    HEAD_PATTERNS,
    BaseSpec,
    Flag,
    ModelSpec,
    PushSettings,
    Recipe,
    RecipePath,
    StrictModel,
    model_label,
    parse_size,
    path_keys,
    scaled_weights,
)

__all__ = ["HEAD_PATTERNS", "WEIGHT_SUFFIXES", "BaseSpec", "Flag", "ModelSpec", "PushSettings", "Recipe",
           "RecipePath", "StrictModel", "apply_overrides", "dump_recipe", "format_key", "load_toml",
           "model_label", "parse_size", "path_keys", "recipe_from_data", "resolve_local", "scaled_weights",
           "unknown_key", "validation_problems"]
