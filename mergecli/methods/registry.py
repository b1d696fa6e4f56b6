"""The methods recipes may name: the built-in ones, found by module name and imported the first time
one is asked for, and those registered by plugins; and binding a recipe to its method, which
validates the method's own keys.
"""

from __future__ import annotations

import difflib
import importlib
import math

from pydantic import BaseModel, ValidationError

from mergecli.errors import RecipeError, UsageError
from mergecli.methods.base import Method, registered
from mergecli.recipe import ModelSpec, Recipe, scaled_weights, unknown_key, validation_problems

# Methods that ship with mergecli, as module names: a module registers its method when imported, like
# pytest's built-in plugins, so that looking up a method never loads the others.
BUILTIN_METHODS = {"average": "mergecli.methods.average", "regmean": "mergecli.methods.regmean.method",
                   "task_arithmetic": "mergecli.methods.task_arithmetic", "ties": "mergecli.methods.ties",
                   "dare_linear": "mergecli.methods.dare", "dare_ties": "mergecli.methods.dare",
                   "slerp": "mergecli.methods.slerp"}


def method_names() -> list[str]:
    """Every method a recipe may name."""
    return sorted({*BUILTIN_METHODS, *registered})


def get_method(name: str) -> Method:
    """The registered method called `name`.

    Raises:
        UsageError: no method has that name.
    """
    if name not in registered and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
    if name not in registered:
        raise UsageError(f"unknown method {name!r}", hint=f"methods: {', '.join(method_names())}")
    return registered[name]


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
        close = difflib.get_close_matches(recipe.method, method_names(), n=1, cutoff=0.6)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(recipe.source, [recipe.locate(f"method: unknown method {recipe.method!r}; {guess}(methods: "
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
    if method.normalize(recipe) and math.fsum(scaled_weights(recipe.models)[0]) == 0.0:
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
