"""Writing recipes: the resolved recipe stored in every output as `mergecli.toml`, as TOML with every
default filled in, so that it reproduces the merge."""

from __future__ import annotations

from typing import Any

from mergecli.recipe.schema import METHOD_TABLES, Recipe


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as TOML, every default filled in, so that it reproduces the merge."""
    data = recipe.model_dump(exclude_none=True)
    for table in METHOD_TABLES:
        if table != recipe.method:
            data.pop(table)  # meaningless for other methods: keep the resolved recipe readable
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif key == "models":
            continue
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    for model in data["models"]:
        lines.append("\n[[models]]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in model.items())
    return "\n".join(lines) + "\n"
