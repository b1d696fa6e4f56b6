"""A mergekit config's translation, as far as the recipe goes: the recipe's data with, for every key,
the place in the config it came from; mergekit's model references; and the check that the data is a
valid recipe, each problem said at its place in the config. Which key goes where is the methods'
knowledge (merge/mergekit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecli.errors import RecipeError
from mergecli.recipe.dump import dump_data
from mergecli.recipe.load import recipe_from_data
from mergecli.recipe.schema import Recipe
from mergecli.recipe.yaml_reader import Document, Path_


@dataclass
class Converted:
    """A config translated: the recipe's data, where in the config each recipe key came from (`line 7:
    models.1.parameters.weight`), and notes on what mergekit ignores and so is left out."""

    data: dict[str, Any]
    document: Document
    origins: dict[Path_, str] = field(default_factory=dict)  # recipe key path → the config's place
    notes: list[str] = field(default_factory=list)

    def put(self, path: Path_, value: Any, origin: Path_ | str) -> None:
        """Set the recipe key at `path` (tables and list items made as needed) from the config's `origin`
        (a key path in this document, or a place already said)."""
        node = self.data
        for part, following in zip(path[:-1], path[1:]):
            if isinstance(part, int):
                while len(node) <= part:
                    node.append({})
                node = node[part]
            else:
                node = node.setdefault(part, [] if isinstance(following, int) else {})
        node[path[-1]] = value
        self.origins[path] = origin if isinstance(origin, str) else self.document.where(origin)

    def config_key(self, recipe_key: str) -> str:
        """The config's place for a problem with `recipe_key` (`models.1.weight`), with its line."""
        path = tuple(int(part) if part.isdigit() else part for part in recipe_key.split("."))
        while path and path not in self.origins:
            path = path[:-1]
        return self.origins[path] if path else recipe_key

    def locate(self, problem: str) -> str:
        """A recipe problem (`models.1.weight: ...`) said with the config's key and line instead."""
        key, sep, words = problem.partition(": ")
        return f"{self.config_key(key)}: {words}" if sep and " " not in key else problem


@dataclass(frozen=True)
class ModelRef:
    """A model in a config: its path, revision, and a LoRA adapter applied to it (`model+lora`)."""

    path: str
    revision: str | None = None
    lora: str | None = None


def model_ref(document: Document, path: Path_, value: Any) -> ModelRef:
    """mergekit's model reference: `path[@revision][+lora[@revision]]`, or `{model: ..., lora: ...}`.

    Raises:
        RecipeError: not a model reference, or one that overrides the architecture.
    """
    if isinstance(value, dict):
        unknown = [key for key in value if key not in ("model", "lora", "override_architecture", "path", "revision")]
        if unknown:
            raise document.error((*path, unknown[0]), "unknown key of a model reference (model, lora)")
        if value.get("override_architecture") is not None:
            raise document.error((*path, "override_architecture"), "overriding a model's architecture is not "
                                                                   "supported")
        if "path" in value:  # mergekit's ModelPath: {path, revision}
            if not isinstance(value["path"], str) or not value["path"]:
                raise document.error((*path, "path"), "expected a path or a hub repo id")
            revision = value.get("revision")
            return ModelRef(value["path"], revision if isinstance(revision, str) else None)
        inner = model_ref(document, (*path, "model"), value.get("model"))
        if value.get("lora") is not None:
            return ModelRef(inner.path, inner.revision, model_ref(document, (*path, "lora"), value["lora"]).path)
        return inner
    if not isinstance(value, str) or not value.strip():
        raise document.error(path, "expected a model: a path or a hub repo id")
    model, _, lora = value.partition("+")
    name, at, revision = model.partition("@")
    if not name or (at and not revision) or "+" in lora or model.count("@") > 1:
        raise document.error(path, f"cannot read the model reference {value!r} (PATH[@REVISION][+LORA])")
    return ModelRef(name, revision or None, lora or None)


def check(converted: Converted, *, base_dir: Path, overrides: list[str] = ()) -> Recipe:
    """The converted data validated as a recipe, with paths resolved against `base_dir` (mergekit reads
    them from the current directory) and `--set` overrides applied; a problem is said with the config's
    key and line, and so are the problems of the method's own keys, found when the recipe is bound.

    Raises:
        RecipeError: one line per problem, naming the config's key and line.
    """
    source = converted.document.source
    try:
        recipe = recipe_from_data(_copy(converted.data), source=source, base_dir=base_dir, overrides=overrides)
    except RecipeError as exc:
        raise RecipeError(source, [converted.locate(problem) for problem in exc.problems], hint=exc.hint) from None
    recipe.locate_with(converted.locate)
    return recipe


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def recipe_text(converted: Converted, *, source: str) -> str:
    """The recipe as TOML, with a line saying where it came from and one per note."""
    notes = "".join(f"# note: {note}\n" for note in converted.notes)
    return f"# converted from {source} by `mergecli convert`\n{notes}" + dump_data(converted.data)
