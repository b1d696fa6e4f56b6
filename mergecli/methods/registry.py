"""The methods recipes may name: the built-in ones, found by their files' declarations (catalog.py) and
imported the first time one is asked for, and those registered by plugins; mergekit's names for them;
and binding a recipe to its method, which validates the method's own keys.
"""

from __future__ import annotations

import difflib
import importlib
import math

from pydantic import BaseModel, ValidationError

from mergecli.errors import RecipeError, UsageError
from mergecli.methods import catalog
from mergecli.methods.base import Method, registered
from mergecli.recipe import ModelSpec, Recipe, scaled_weights, unknown_key, validation_problems


def builtin_modules() -> dict[str, str]:
    """The built-in methods' modules by method name, as their files declare them (methods/catalog.py):
    a module registers its method when imported, like pytest's built-in plugins, so looking up one
    method never loads the others."""
    return {name: entry.module for name, entry in catalog.builtin().items()}


def method_names() -> list[str]:
    """Every method a recipe may name."""
    return sorted({*catalog.builtin(), *registered})


def method_help() -> dict[str, str]:
    """Each method's one-line help, by name (the built-in ones read from their files, nothing imported)."""
    found = {name: entry.help for name, entry in catalog.builtin().items()}
    found.update({name: method.help for name, method in registered.items()})
    return dict(sorted(found.items()))


def get_method(name: str) -> Method:
    """The registered method called `name`.

    Raises:
        UsageError: no method has that name.
    """
    modules = builtin_modules()
    if name not in registered and name in modules:
        importlib.import_module(modules[name])
    if name not in registered:
        raise UsageError(f"unknown method {name!r}", hint=f"methods: {', '.join(method_names())}")
    return registered[name]


def by_mergekit_name(name: str) -> Method | None:
    """The method that mergekit calls `name` (its `merge_method`), or None."""
    for method_name, entry in catalog.builtin().items():
        if name in entry.mergekit:
            return get_method(method_name)
    return next((method for method in registered.values()
                 if name in ((method.mergekit,) if isinstance(method.mergekit, str) else method.mergekit)), None)


def mergekit_names() -> list[str]:
    """mergekit's names of the methods mergecli has."""
    names = {name for entry in catalog.builtin().values() for name in entry.mergekit}
    for method in registered.values():
        names.update((method.mergekit,) if isinstance(method.mergekit, str) else method.mergekit)
    return sorted(names)


def closest(name: str, names: list[str]) -> str | None:
    """The name among `names` that `name` most likely meant: the same but for case, else a close one."""
    same = [candidate for candidate in names if candidate.lower() == name.lower()]
    close = same or difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    return close[0] if close else None


def method_of(recipe: Recipe) -> Method:
    """The method a recipe names, with the recipe bound to it: the method's own keys validated and
    kept in the recipe (`recipe.settings`, `recipe.models[i].settings`).

    Raises:
        RecipeError: no method has that name, or its keys do not validate (one line per problem,
            naming the recipe file).
    """
    try:
        method = get_method(recipe.method)
    except UsageError:
        close = closest(recipe.method, method_names())
        guess = f"; did you mean {close!r}?" if close else ""
        raise RecipeError(recipe.source, [recipe.locate(f"method: unknown method {recipe.method!r}{guess} (methods: "
                                                        f"{', '.join(method_names())})")]) from None
    problems = [f"{name}: {unknown_key(name, [*Recipe.model_fields, *method_names()])}"
                for name in recipe.tables if name not in method_names()]
    context = {"base_dir": recipe.base_dir}
    settings, problems = _validated(method.settings, recipe.tables.get(method.name), (method.name,), context,
                                    problems, [], recipe.overrides)
    model_settings = []
    for index, spec in enumerate(recipe.models):
        options, problems = _validated(method.model_settings, spec.options, ("models", index), context, problems,
                                       list(ModelSpec.model_fields), recipe.overrides)
        model_settings.append(options)
    if method.normalize(recipe) and not recipe.weights_vary and math.fsum(scaled_weights(recipe.weights_at())[0]) == 0:
        fix = "pass --set normalize=false" if recipe.source == "command line" else "set normalize = false"
        problems.append(f"weights sum to 0, so they cannot be normalized ({fix}?)")
    if problems:
        raise RecipeError(recipe.source, [recipe.locate(problem) for problem in problems])
    recipe.bind(settings, model_settings)
    return method


def _validated(model: type[BaseModel] | None, data: dict | None, where: tuple, context: dict, problems: list[str],
               common: list[str], overrides: list[str]) -> tuple[BaseModel | None, list[str]]:
    """`data` (a method's table, or a model's method keys) validated by `model`, or the problems."""
    if model is None:
        keys = ['.'.join(map(str, (*where, key))) for key in data or {}]
        return None, problems + [f"{'--set ' if key in overrides else ''}{key}: "
                                 f"{unknown_key(key.rsplit('.', 1)[-1], common)}" for key in keys]
    try:
        return model.model_validate(data or {}, context=context), problems
    except ValidationError as exc:
        return None, problems + validation_problems(exc, prefix=where, known=[*common, *model.model_fields],
                                                    overrides=overrides)
