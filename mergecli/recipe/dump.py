"""Writing recipes: the resolved recipe stored in every output as `mergecli.toml`, as TOML with every
default filled in, so that it reproduces the merge."""

from __future__ import annotations

import re
from typing import Any

from mergecli.recipe.schema import Recipe

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # written as \uXXXX: TOML's basic strings allow none of them raw
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", escaped) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_value(key)


TABLE_ARRAYS = ("models", "slices", "stages")  # written as [[...]] tables; other lists are values


def _lines(data: dict[str, Any], prefix: str) -> list[str]:
    """One table's lines: its values, then its sub-tables (`[ties]`, `[slices.slerp]`), then its arrays
    of tables (`[[models]]`, `[[stages.models]]`); a stage's keys and tables nest under its own."""
    lines = [f"{_toml_key(key)} = {toml_value(value)}" for key, value in data.items()
             if not isinstance(value, dict) and not (key in TABLE_ARRAYS and isinstance(value, list))]
    for key, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{prefix}{_toml_key(key)}]", *_lines(table, f"{prefix}{_toml_key(key)}.")]
    for key in TABLE_ARRAYS:
        for entry in data.get(key) or [] if isinstance(data.get(key), list) else []:
            lines += ["", f"[[{prefix}{key}]]", *_lines(entry, f"{prefix}{key}.")]
    return lines


def dump_data(data: dict[str, Any]) -> str:
    """Recipe data as TOML: its keys, then its tables (`[base]`, `[ties]`, `[tokens]`), then its arrays of
    tables (`[[models]]`, `[[slices]]`, `[[stages]]`, each stage a recipe of its own under its header)."""
    return "\n".join(_lines(data, "")).lstrip("\n") + "\n"


def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as TOML data, every default filled in: the method's own table and model keys as the
    method validated them (tables of other methods are left out), its slices' and stages' too."""
    data = recipe.model_dump(exclude_none=True, exclude={"slices", "stages", "tokens"})
    settings = recipe.settings
    table = settings.model_dump(exclude_none=True, by_alias=True) if settings is not None \
        else recipe.tables.get(recipe.method)
    if table:
        data[recipe.method] = table
    for entry, spec in zip(data["models"], recipe.models):
        entry.update(spec.settings.model_dump(exclude_none=True, by_alias=True) if spec.settings is not None
                     else spec.options)
    if recipe.tokens:
        data["tokens"] = {token: spec.model_dump(exclude_none=True) for token, spec in recipe.tokens.items()}
    if recipe.slices:
        data["slices"] = [{"sources": [{**source.model_dump(exclude_none=True), "layers": list(source.layers),
                                        **source.options} for source in spec.sources], **spec.tables}
                          for spec in recipe.slices]
    if recipe.stages:
        data["stages"] = [recipe_data(stage) for stage in recipe.stages]
    return data


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML, every default filled in, so that it reproduces the merge."""
    return dump_data(recipe_data(recipe))
