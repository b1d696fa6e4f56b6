"""Loading recipes: the only code that reads recipe TOML. `--set` overrides are applied, relative paths
made absolute against the recipe's directory, and validation errors become one line per problem.

Relative paths in a recipe (models, base, data, output, and a method's `RecipePath` keys such as
stats_dir) are relative to the recipe file's directory, so a recipe means the same thing whatever
directory CI runs it from.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from mergecli.errors import RecipeError
from mergecli.recipe.names import WEIGHT_SUFFIXES
from mergecli.recipe.schema import STAGE, BaseSpec, ModelSpec, PushSettings, Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# A key path (list items as `int`) → the model of that table, for "did you mean".
TABLES: dict[tuple, type[BaseModel]] = {(): Recipe, ("base",): BaseSpec, ("models", int): ModelSpec,
                                        ("push",): PushSettings}


def format_key(loc: tuple[Any, ...]) -> str:
    """`models.1.weight`: a key's path in the recipe."""
    return ".".join(str(part) for part in loc) or "(recipe)"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the recipe's common schema allows in the table at `loc`."""
    shape = tuple(int if isinstance(part, int) else part for part in loc)
    model = TABLES.get(shape)
    return list(model.model_fields) if model else []


def unknown_key(key: str, known: list[str]) -> str:
    """The message for a key that no table declares: a close match, else where the keys are listed."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"unknown key; did you mean {close[0]!r}?" if close else \
        "unknown key (check the spelling; see the README for the recipe keys)"


def validation_problems(error: ValidationError, *, prefix: tuple[Any, ...] = (),
                        known: list[str] | None = None, overrides: list[str] = ()) -> list[str]:
    """One line per problem of a validation `error`: `models.1.weight: Input should be a valid number`.

    Args:
        prefix: where the validated table sits in the recipe (`("ties",)`), for the key paths.
        known: the table's keys, for "did you mean" (default: the common schema's at that path).
        overrides: the keys `--set` gave: a problem with one of them is `--set KEY: ...`, the recipe
            file was not where it came from.
    """
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = unknown_key(str(loc[-1]), known if known is not None else _known_keys(loc[:-1]))
        elif item["type"] == "bool_type":
            message = "expected true or false"
        message = message.removeprefix("Value error, ")
        key = format_key(prefix + loc)
        given = any(key == o or key.startswith(o + ".") for o in overrides)
        problems.append(f"{'--set ' if given else ''}{key}: {message}")
    return problems


def _parse_value(key: str, text: str, source: str) -> Any:
    """A `--set` value: a TOML value (number, bool, string, list) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except RecursionError:
        raise RecipeError(source, [f"--set {key}: the value is nested too deeply"]) from None
    except tomllib.TOMLDecodeError as exc:
        if text.strip().startswith(("[", "{", '"', "'")):
            raise RecipeError(source, [f"--set {key}: not a valid TOML value ({exc}); "
                                       "for regexes use 'single quotes'"]) from None
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str], *, source: str) -> dict[str, Any]:
    """Apply `key.path=value` overrides to raw recipe data (lists are indexed from 0)."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise RecipeError(source, [f"--set {override!r}: expected KEY=VALUE, e.g. normalize=false"])
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(source, [f"--set {key}: no list item {part!r} (there are {len(node)})"])
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if not last and index not in node:
                    node[index] = {}
            else:
                raise RecipeError(source, [f"--set {key}: {'.'.join(parts[:i])} is not a table or list"])
            if last:
                node[index] = _parse_value(key, text, source)
            else:
                node = node[index]
    return data


def _is_local_path(path: str) -> bool:
    return (
        path.startswith((".", "/", "~", "\\"))
        or path.endswith(WEIGHT_SUFFIXES)
        or path.count("/") > 1
        or re.match(r"^[A-Za-z]:[\\/]", path) is not None
    )


def resolve_local(path: str, base_dir: Path) -> str:
    """Make a recipe path absolute against `base_dir`, unless it may be a hub repo id.

    A path that exists locally is always local; `org/name` or a bare name (`gpt2`) that does not
    exist is left as is, for the hub resolver to try.
    """
    candidate = Path(os.path.abspath(base_dir / Path(path).expanduser()))
    if candidate.exists() or _is_local_path(path):
        return str(candidate)
    return path


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """The recipe's local paths made absolute against `base_dir` (its stages' too); a model named by an
    earlier stage (`stage:NAME`) or a hub repo id is left as it is."""
    models = data.get("models") if isinstance(data.get("models"), list) else []
    for entry in [data.get("base"), *models]:
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and path and not path.startswith(STAGE):
            entry["path"] = resolve_local(path, base_dir)
        if isinstance(entry, dict) and isinstance(entry.get("data"), str):
            entry["data"] = os.path.abspath(base_dir / Path(entry["data"]).expanduser())
        if isinstance(entry, dict) and isinstance(entry.get("base"), str) and entry["base"]:
            entry["base"] = resolve_local(entry["base"], base_dir)  # a LoRA adapter's base
    tokenizer = data.get("tokenizer")
    names = {entry.get("name") for entry in models if isinstance(entry, dict)}
    if isinstance(tokenizer, str) and tokenizer not in ("base", "union", *names) and "/" in tokenizer:
        data["tokenizer"] = resolve_local(tokenizer, base_dir)  # a model the merge does not read: its tokenizer
    if isinstance(data.get("output"), str):
        data["output"] = os.path.abspath(base_dir / Path(data["output"]).expanduser())
    for stage in data.get("stages") if isinstance(data.get("stages"), list) else []:
        if isinstance(stage, dict):
            _resolve_paths(stage, base_dir)
    return data


def recipe_from_data(data: dict[str, Any], *, source: str, base_dir: Path,
                     overrides: list[str] = ()) -> Recipe:
    """Validate raw recipe data (after `--set` overrides), resolving paths against `base_dir`."""
    data = apply_overrides(data, list(overrides), source=source)
    data = _resolve_paths(data, base_dir)
    given = [override.partition("=")[0].strip() for override in overrides]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, validation_problems(exc, overrides=given)) from None
    except RecursionError:
        raise RecipeError(source, ["invalid recipe: its values are nested too deeply"]) from None
    recipe._source = source
    recipe._base_dir = base_dir
    recipe._overrides = given
    return recipe


def load_toml(path: str | Path, *, overrides: list[str] = ()) -> Recipe:
    """Read and validate a TOML recipe (`merge.configs.load_recipe` reads mergekit configs too)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(source, ["no such recipe file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(source, [f"cannot read: {exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(source, [f"invalid TOML: {exc}"]) from None
    except RecursionError:  # arrays or tables nested thousands deep: no recipe looks like that
        raise RecipeError(source, ["invalid recipe: its values are nested too deeply"]) from None
    return recipe_from_data(data, source=source, base_dir=Path(os.path.abspath(path)).parent, overrides=overrides)
