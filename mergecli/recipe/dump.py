"""Writing recipes: the resolved recipe stored in every output as `mergecli.toml`, as TOML with every
default filled in, so that it reproduces the merge."""

from __future__ import annotations

from typing import Any

from mergecli.recipe.schema import Recipe


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)


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
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif key == "models":
            continue
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
    for model in data["models"]:
        lines.append("\n[[models]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in model.items())
    return "\n".join(lines) + "\n"
