"""Slices (mergekit's `slices`): an output whose layers are layer ranges of the models, slice after slice,
each slice's sources (of equal lengths) merged by the recipe's method, one source taken as it is.

Each slice is planned as a merge of its own: its sources are the models of a sub-recipe (a model's keys
set on a source win over its entry; the slice's table over the recipe's), seen through `LayerView`s
that give source layer `start + k` the output's name for layer `offset + k`. Tensors outside the layers
come from the first slice's sources (embeddings: mergekit's pre-weights) or the last slice's (final
norm, head: its post-weights), merged the same way. Positions among the layers, for gradients, are
taken within each slice (k / (n − 1)), and 0 outside the layers, as mergekit takes them. Everything
streams as before: a slice adds no memory, only names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mergecli.errors import RecipeError
from mergecli.io.blocks import block_of, depths, position, renumbered
from mergecli.io.checkpoint import Checkpoint
from mergecli.methods.base import Inputs
from mergecli.methods.registry import method_of
from mergecli.recipe import Recipe, recipe_from_data
from mergecli.recipe.dump import recipe_data

# names of tensors before the layers (mergekit's pre-weights); every other tensor outside them comes after
PRE_WEIGHTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type", "patch", "shared",
               "rotary", "pos_emb")


class LayerView:
    """A checkpoint seen under the output's names: `names` maps each output tensor to the checkpoint's."""

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str]):
        self.checkpoint, self.names = checkpoint, names
        self.tensors = {out: checkpoint.tensors[stored] for out, stored in names.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checkpoint, name)

    def read(self, name: str, rows: tuple[int, int] | None = None, **kwargs: Any) -> Any:
        return self.checkpoint.read(self.names[name], rows, **kwargs)

    def remote_reads(self, name: str, rows: tuple[int, int] | None) -> Any:
        return self.checkpoint.remote_reads(self.names[name], rows)

    def close(self) -> None:
        self.checkpoint.close()


@dataclass
class Slice:
    """One slice planned: its sub-recipe (bound to the method), its inputs under the output's names, and
    each output tensor's position among the layers."""

    recipe: Recipe
    inputs: Inputs
    places: dict[str, float]
    layers: list[tuple[int, int]]  # per output layer of the slice: (the source's index in inputs.all, its layer)


def is_pre(name: str) -> bool:
    return any(hint in name for hint in PRE_WEIGHTS)


def sub_recipe(recipe: Recipe, number: int) -> Recipe:
    """Slice `number` of `recipe` as a recipe of its own: its sources as the models (the base where a
    source is "base"), a model's keys set on a source winning over its entry, and the slice's table over
    the recipe's; bound to the method, a problem said with the slice's keys."""
    spec = recipe.slices[number]
    data = recipe_data(recipe)
    entries = {entry["name"]: entry for entry in data["models"]}
    models, names = [], []
    for index, source in enumerate(spec.sources):
        if source.model == "base":
            continue
        entry = {**entries[source.model], **source.options}
        if source.weight is not None:
            entry["weight"] = source.weight
        name = entry["name"] if entry["name"] not in names else f"{entry['name']}-{index}"
        entry["name"] = name
        names.append(name)
        models.append(entry)
    data.update(models=models, slices=None, stages=None)
    if not any(source.model == "base" for source in spec.sources):
        data.pop("base", None)
    for method, table in spec.tables.items():
        data[method] = {**data.get(method, {}), **table}
    data = {key: value for key, value in data.items() if value is not None}
    sources = [index for index, source in enumerate(spec.sources) if source.model != "base"]

    def locate(problem: str) -> str:
        key, sep, words = problem.partition(": ")
        parts = key.split(".")
        if parts[0] == "models" and len(parts) > 1 and parts[1].isdigit():
            parts[:2] = ["slices", str(number), "sources", str(sources[int(parts[1])])]
        elif parts[0] == recipe.method:
            parts[:1] = ["slices", str(number), recipe.method]
        return recipe.locate(f"{'.'.join(parts)}{sep}{words}")

    try:
        sub = recipe_from_data(data, source=recipe.source, base_dir=recipe.base_dir)
    except RecipeError as exc:
        raise RecipeError(recipe.source, [locate(problem) for problem in exc.problems]) from None
    sub.locate_with(locate)
    method_of(sub)
    return sub


def check_sources(recipe: Recipe) -> None:
    """Every source of every slice names a model of the recipe, or "base" where there is one.

    Raises:
        RecipeError: one line per problem.
    """
    names = [spec.name for spec in recipe.models] + (["base"] if recipe.base else [])
    problems = [f"slices.{n}.sources.{i}.model: {source.model!r} is not a model of the recipe ({', '.join(names)})"
                for n, spec in enumerate(recipe.slices or []) for i, source in enumerate(spec.sources)
                if source.model not in names]
    if problems:
        raise RecipeError(recipe.source, [recipe.locate(problem) for problem in problems])


def plan_slices(recipe: Recipe, inputs: Inputs, subs: list[Recipe]) -> list[Slice]:
    """Each slice's inputs under the output's names.

    Raises:
        RecipeError: a source's layers past its model's.
    """
    by_name = dict(zip(recipe.input_names, inputs.all))
    first, offset, planned = recipe.slices[0].sources[0], 0, []
    reference = by_name[first.model]
    outside = [name for name in reference.tensors if block_of(name) is None]
    blocks = depths(reference.tensors)
    for number, (spec, sub) in enumerate(zip(recipe.slices, subs)):
        count = spec.count
        views, layers = [], []
        for index, source in enumerate(spec.sources):
            checkpoint = by_name[source.model]
            depth = max(depths(checkpoint.tensors).values(), default=0)
            if source.layers[1] > depth:
                raise RecipeError(recipe.source, [recipe.locate(
                    f"slices.{number}.sources.{index}.layers: {list(source.layers)} reaches past the "
                    f"{depth} layers of {source.model}")])
            names = {}
            for name in checkpoint.tensors:
                block = block_of(name)
                if block is not None and block[0] in blocks and source.layers[0] <= block[1] < source.layers[1]:
                    names[renumbered(name, offset + block[1] - source.layers[0])] = name
                elif block is None and ((number == 0 and is_pre(name)) or
                                        (number == len(subs) - 1 and not is_pre(name))) and name in outside:
                    names[name] = name
            views.append(LayerView(checkpoint, names))
        if not any(source.model == "base" for source in spec.sources):
            base_view, model_views = None, views
        else:
            at = next(i for i, source in enumerate(spec.sources) if source.model == "base")
            base_view, model_views = views[at], views[:at] + views[at + 1:]
        places = {name: position(block_of(name)[1] - offset, count) if block_of(name) else 0.0
                  for name in views[0].tensors}
        source_at = recipe.input_names.index(spec.sources[0].model)
        layers = [(source_at, spec.sources[0].layers[0] + k) for k in range(count)]
        planned.append(Slice(sub, dataclasses.replace(inputs, models=model_views, base=base_view), places, layers))
        offset += count
    return planned
