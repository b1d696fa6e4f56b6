"""Models' default names: from their paths, unique among a recipe's models (a name also names a model's
statistics directory, and what messages and cards call it)."""

from __future__ import annotations

import re

from mergecli.recipe.strict import StrictModel

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # files that hold weights
GENERIC_FILES = ("model", "pytorch_model", "model.safetensors", "adapter_model")  # names that say nothing


def _default_name(path: str, depth: int = 1) -> str:
    """A model's name from its path: the last component without its weight suffix, or its folder's
    for a generic file name (`a/model.safetensors` → `a`); `depth` more components when needed to
    tell models apart (`x/a` and `y/a` → `x-a`, `y-a`)."""
    if path.startswith("stage:"):  # an earlier stage of the recipe: its own name
        return path.removeprefix("stage:")
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return path
    last = parts[-1]
    for suffix in WEIGHT_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
    if last in GENERIC_FILES and len(parts) > 1:
        parts = parts[:-1]
    else:
        parts[-1] = last
    name = "-".join(parts[-depth:])
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"


def default_names(paths: list[str], taken: list[str] = ()) -> list[str]:
    """Names for models at `paths`, from their paths, unique among themselves and `taken` when the paths
    allow (more of the path, as needed)."""
    depth = dict.fromkeys(range(len(paths)), 1)
    names = []
    for _ in range(8):
        names = [_default_name(path, depth[i]) for i, path in enumerate(paths)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 or name in taken]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    return names


def fill_names(models: list[StrictModel]) -> None:
    """Give every model without a `name` one from its path (`default_names`)."""
    unnamed = [m for m in models if not m.name]
    for model, name in zip(unnamed, default_names([m.path for m in unnamed], [m.name for m in models if m.name])):
        object.__setattr__(model, "name", name)


