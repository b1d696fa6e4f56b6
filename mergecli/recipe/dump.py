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


def dump_data(data: dict[str, Any]) -> str:
    """Recipe data as TOML: its keys, then its tables (`[base]`, `[ties]`), then `[[models]]` entries."""
    lines = [f"{_toml_key(key)} = {toml_value(value)}" for key, value in data.items()
             if not isinstance(value, dict) and key != "models"]
    for key, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items())
    for model in data.get("models", []):
        lines.append("\n[[models]]")
        lines.extend(f"{_toml_key(k)} = {toml_value(v)}" for k, v in model.items())
    return "\n".join(lines) + "\n"


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML, every default filled in, so that it reproduces the merge: the method's own
    table and model keys as the method validated them (tables of other methods are left out)."""
    data = recipe.model_dump(exclude_none=True)
    settings = recipe.settings
    table = settings.model_dump(exclude_none=True, by_alias=True) if settings is not None \
        else recipe.tables.get(recipe.method)
    if table:
        data[recipe.method] = table
    for entry, spec in zip(data["models"], recipe.models):
        entry.update(spec.settings.model_dump(exclude_none=True, by_alias=True) if spec.settings is not None
                     else spec.options)
    return dump_data(data)
