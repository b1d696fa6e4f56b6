"""mergekit config files, read as recipes: a TOML recipe or a mergekit YAML config, by one function
(`load_recipe`); a config's several documents (mergekit-multi) as stages; and a translation's local
paths made relative to the folder a converted recipe is written to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergecli.errors import RecipeError, UsageError
from mergecli.merge.mergekit import STAGE, translate
from mergecli.recipe import Recipe, load_toml
from mergecli.recipe.convert import Converted, check
from mergecli.recipe.yaml_reader import Document, load_documents

YAML_SUFFIXES = (".yml", ".yaml")


def read_config(path: Path) -> Converted:
    """A mergekit config file, read strictly and translated; several documents (mergekit-multi) become
    stages, the unnamed document (else the last) the final merge, the others in the order they need.

    Raises:
        RecipeError: unreadable, not YAML, or not a config mergecli can run.
    """
    documents = [document for document in load_documents(path) if document.data is not None]
    if not documents:
        raise RecipeError(str(path), ["holds no YAML document"])
    if len(documents) == 1:
        return translate(documents[0])
    named = {}
    final = None
    for document in documents:
        name = document.data.get("name") if isinstance(document.data, dict) else None
        if name is None:
            if final is not None:
                raise document.error((), "a second unnamed document: only the final merge has no name")
            final = document
        elif not isinstance(name, str) or name in named:
            raise document.error(("name",), "a stage's name must be a string, once" if name in named or
                                 not isinstance(name, str) else "")
        else:
            named[name] = document
    if final is None:  # every document named: the last one is the merge this file makes
        final = documents[-1]
        named = {name: document for name, document in named.items() if document is not final}
    order = _stage_order(named)
    converted = translate(final, stages=set(order))
    for number, name in enumerate(order):
        stage = translate(named[name], stages=set(order[:number]))
        stage.data = {"name": name, **stage.data}
        stage.origins[("name",)] = named[name].where(("name",))
        for key, value in stage.data.items():
            converted.data.setdefault("stages", [{} for _ in order])[number][key] = value
        converted.origins.update({("stages", number, *key): where for key, where in stage.origins.items()})
        converted.notes += stage.notes
    return converted


def _stage_order(named: dict[str, Document]) -> list[str]:
    """The stages in an order where each comes after the stages it uses (mergekit-multi's graph)."""
    uses = {name: {other for other in named if other != name and other in _model_paths(document.data)}
            for name, document in named.items()}
    order: list[str] = []
    while len(order) < len(named):
        ready = [name for name in named if name not in order and uses[name] <= set(order)]
        if not ready:
            cycle = sorted(name for name in named if name not in order)
            raise named[cycle[0]].error(("name",), f"the stages {', '.join(cycle)} use each other in a circle")
        order.append(ready[0])
    return order


def _model_paths(value: Any) -> set[str]:
    """Every string in a config that may be a model path (to find which stages a document uses)."""
    if isinstance(value, dict):
        return set().union(*(_model_paths(item) for item in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_model_paths(item) for item in value)) if value else set()
    return {value.partition("@")[0].partition("+")[0]} if isinstance(value, str) else set()


def load_recipe(path: str | Path, *, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe: TOML, or a mergekit config run as it is (its relative paths read
    from the current directory, as mergekit reads them).

    Args:
        path: the recipe file (`.toml`), or a mergekit config (`.yml` / `.yaml`).
        overrides: `key.path=value` strings applied before validation (recipe keys; for a mergekit
            config, keys of its translation).

    Returns:
        The validated, frozen `Recipe`, with local paths made absolute.

    Raises:
        RecipeError: unreadable file, invalid TOML or YAML, or invalid keys, one line per problem.

    Example:
        >>> recipe = load_recipe("recipes/demo-average.toml", overrides=["normalize=false"])
    """
    path = Path(path)
    if path.suffix.lower() not in YAML_SUFFIXES:
        return load_toml(path, overrides=overrides)
    converted = read_config(path)
    recipe = check(converted, base_dir=Path.cwd(), overrides=overrides)
    recipe.notes.extend(converted.notes)
    return recipe


def rebased(converted: Converted, recipe_dir: Path) -> Converted:
    """The translation with its local paths (relative to the current directory, as mergekit reads them)
    made relative to `recipe_dir`, where the recipe will be written: a recipe's relative paths are
    relative to its own folder."""
    def moved(path: str) -> str:
        if path.startswith(STAGE) or Path(path).is_absolute() or not Path(path).exists():
            return path  # a stage, an absolute path, or a hub repo id
        return os.path.relpath(os.path.abspath(path), os.path.abspath(recipe_dir))

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(item, key) for item in node]
        return moved(node) if key == "path" and isinstance(node, str) else node

    return Converted(walk(converted.data), converted.document, dict(converted.origins), list(converted.notes))


def write_recipe(path: Path, text: str, *, force: bool = False) -> None:
    """Write a converted recipe; an existing file only with `force`.

    Raises:
        UsageError: the file exists and `force` is not given.
    """
    if path.exists() and not force:
        raise UsageError(f"{path} exists", hint="pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
