"""Recipes: strict pydantic models of the TOML schema, `--set` overrides, and TOML output.

`load_recipe` is the only code that reads recipe TOML. Relative paths in a recipe (models, base,
data, output, stats_dir) are relative to the recipe file's directory, so a recipe means the same
thing whatever directory CI runs it from; the resolved recipe written into every output holds
absolute paths and pinned hub commits.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mergecli.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Dtype = Literal["auto", "float32", "float16", "bfloat16"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEAD_PATTERNS = [r"lm_head\..*", r"score\..*", r"classifier\..*"]  # `head`'s default
METHOD_TABLES = ("regmean",)  # tables that only the method of the same name reads


def parse_size(value: int | str) -> int:
    """Parse `5GB` (10^9), `500MiB` (2^20) or a plain byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '5GB'")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as '5GB' or '500MB', got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


def _default_name(path: str) -> str:
    name = path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in _WEIGHT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(_Strict):
    """The pretrained model: source of head / excluded / integer tensors; never averaged."""

    path: str = Field(min_length=1)
    revision: str | None = None


class ModelSpec(_Strict):
    """One model to merge."""

    path: str = Field(min_length=1)
    revision: str | None = None
    name: str = ""
    weight: float = Field(default=1.0, allow_inf_nan=False)
    data: str | None = None

    @model_validator(mode="after")
    def _fill_name(self) -> ModelSpec:
        name = self.name or _default_name(self.path)
        if not _NAME_RE.fullmatch(name) or name in {".", ".."}:
            raise ValueError(
                f"name {name!r} must be letters, digits, '.', '_' or '-' (it names a stats directory)"
            )
        object.__setattr__(self, "name", name)
        return self


class RegMeanSettings(_Strict):
    stats_dir: str = "stats"
    num_examples: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_length: int = Field(default=512, gt=0)
    text_field: str = "text"
    reduce_non_diagonal_ratio: float = Field(default=0.6, ge=0.0, le=1.0)
    sequential: bool = False  # RegMean++: block l's Grams from inputs through the merged blocks 0..l-1
    memory_budget: int = 2 * 10**9  # hidden states kept in RAM between blocks; beyond, spilled to disk

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> int:
        return parse_size(value)


class PushSettings(_Strict):
    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    message: str | None = None


class Recipe(_Strict):
    """A merge recipe, as in the spec's TOML schema."""

    method: str = Field(default="average", min_length=1)  # a registered method (methods/base.py)
    output: str | None = None
    dtype: Dtype = "auto"
    shard_size: int = 5 * 10**9
    copy_tokenizer: bool = True
    normalize: bool = True
    backbone_only: bool = False
    head: list[str] | None = None
    exclude: list[str] = []
    base: BaseSpec | None = None
    models: list[ModelSpec] = Field(min_length=1)
    regmean: RegMeanSettings = RegMeanSettings()
    push_to_hub: bool = False
    push: PushSettings | None = None
    _source: str = PrivateAttr(default="recipe")

    @property
    def source(self) -> str:
        """Where the recipe came from (its file, or "command line"): what errors about it name."""
        return self._source

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_shard_size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("head", "exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _check_models(self) -> Recipe:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; set `name` for: {', '.join(duplicates)}")
        if self.normalize and math.isclose(sum(m.weight for m in self.models), 0.0, abs_tol=1e-12):
            raise ValueError("weights sum to 0, so they cannot be normalized (set normalize = false?)")
        if self.push_to_hub and not (self.push and self.push.repo_id):
            raise ValueError("push_to_hub = true needs [push] repo_id")
        return self

    @property
    def head_patterns(self) -> list[str]:
        """The regexes of head tensors for `backbone_only` (the `head` key, else HEAD_PATTERNS)."""
        return self.head if self.head is not None else HEAD_PATTERNS

    @property
    def weights(self) -> list[float]:
        """The models' weights, normalized to sum 1 when `normalize`."""
        raw = [m.weight for m in self.models]
        if not self.normalize:
            return raw
        total = sum(raw)
        return [w / total for w in raw]


# ---------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(recipe)"


def _validation_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the README for the recipe keys)"
        message = message.removeprefix("Value error, ")
        problems.append(f"{_format_loc(loc)}: {message}")
    return problems


def _parse_value(key: str, text: str, source: str) -> Any:
    """A `--set` value: a TOML value (number, bool, string, list) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
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
        or path.endswith(_WEIGHT_SUFFIXES)
        or path.count("/") != 1
        or re.match(r"^[A-Za-z]:[\\/]", path) is not None
    )


def resolve_local(path: str, base_dir: Path) -> str:
    """Make a recipe path absolute against `base_dir`, unless it may be a hub repo id.

    A path that exists locally is always local; `org/name` that does not exist is left as is, for
    the hub resolver to try.
    """
    candidate = (base_dir / Path(path).expanduser()).resolve()
    if candidate.exists() or _is_local_path(path):
        return str(candidate)
    return path


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    for entry in [data.get("base"), *data.get("models", [])]:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"]:
            entry["path"] = resolve_local(entry["path"], base_dir)
        if isinstance(entry, dict) and isinstance(entry.get("data"), str):
            entry["data"] = str((base_dir / Path(entry["data"]).expanduser()).resolve())
    if isinstance(data.get("output"), str):
        data["output"] = str((base_dir / Path(data["output"]).expanduser()).resolve())
    regmean = data.get("regmean")
    if isinstance(regmean, dict) and isinstance(regmean.get("stats_dir"), str):
        regmean["stats_dir"] = str((base_dir / Path(regmean["stats_dir"]).expanduser()).resolve())
    elif isinstance(data.get("models"), list):
        data.setdefault("regmean", {})
        if isinstance(data["regmean"], dict):
            data["regmean"]["stats_dir"] = str((base_dir / "stats").resolve())
    return data


def recipe_from_data(data: dict[str, Any], *, source: str, base_dir: Path,
                     overrides: list[str] = ()) -> Recipe:
    """Validate raw recipe data (after `--set` overrides), resolving paths against `base_dir`."""
    data = apply_overrides(data, list(overrides), source=source)
    data = _resolve_paths(data, base_dir)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(source, _validation_problems(exc)) from None
    recipe._source = source
    return recipe


def load_recipe(path: str | Path, *, overrides: list[str] = ()) -> Recipe:
    """Read and validate a TOML recipe.

    Args:
        path: the recipe file.
        overrides: `key.path=value` strings applied before validation.

    Returns:
        The validated, frozen `Recipe`, with local paths made absolute.

    Raises:
        RecipeError: unreadable TOML or invalid keys, one line per problem.

    Example:
        >>> recipe = load_recipe("recipes/demo-average.toml", overrides=["normalize=false"])
    """
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
    return recipe_from_data(data, source=source, base_dir=path.resolve().parent, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Writing (the resolved recipe stored in every output)


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
