"""Merge methods: the `Method` interface every method implements, and the registry of methods by name.

A method is one file: a `Method` subclass, registered with `register`. This module imports nothing
heavy, so that recipes can be validated against the registry without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, ClassVar

from mergecli.errors import UsageError

if TYPE_CHECKING:
    from mergecli.merge.plan import Inputs
    from mergecli.merge.tasks import TensorTask
    from mergecli.recipe import Recipe

# Methods that ship with mergecli, found by module the first time they are asked for (the module
# registers its method when imported), like plugins: nothing below the registry imports them.
BUILTIN_METHODS = {"average": "mergecli.methods.average", "regmean": "mergecli.regmean.method"}
_methods: dict[str, Method] = {}


class Method:
    """What a merge method is, to the rest of mergecli.

    The planner builds one default task per output tensor (averaged, or copied from the reference
    model: head, excluded and integer tensors) and hands them to `tasks`; `validate`, `--dry-run`,
    the summary and the model card describe the result with `title`, `kinds` and `describe`.
    """

    name: ClassVar[str]  # `method = "..."` in a recipe
    title: ClassVar[str]  # what the card, the summary and a push's commit call it: "weighted average"
    command: ClassVar[str] = "average"  # the `mergecli` command that runs it: "average" or "regmean merge"
    table: ClassVar[str | None] = None  # the recipe table it reads ("regmean"), defined in recipe.py
    kinds: ClassVar[dict[str, str]] = {}  # summary labels of the task kinds it adds

    def check(self, recipe: Recipe) -> None:
        """Refuse (UsageError) what the recipe's schema allows but this method cannot run, before any
        input is opened."""

    def tasks(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[TensorTask]:
        """This method's tasks, from the default ones (which average every floating tensor)."""
        return tasks

    def describe(self, recipe: Recipe) -> list[str]:
        """The method's part of the model card's "Method" section (Markdown lines)."""
        return [f"**{self.title}**", ""]


def register(method: Method) -> Method:
    """Make `method` available to recipes (`method = "<its name>"`); returns it."""
    if not getattr(method, "name", "") or not getattr(method, "title", ""):
        raise ValueError("a Method needs a name and a title")
    _methods[method.name] = method
    return method


def method_names() -> list[str]:
    """Every method a recipe may name."""
    return sorted({*BUILTIN_METHODS, *_methods})


def get_method(name: str) -> Method:
    """The registered method called `name`.

    Raises:
        UsageError: no method has that name.
    """
    if name not in _methods and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])
    if name not in _methods:
        raise UsageError(f"unknown method {name!r}", hint=f"methods: {', '.join(method_names())}")
    return _methods[name]
