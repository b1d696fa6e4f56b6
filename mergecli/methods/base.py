"""Merge methods: the `Method` interface (with the `TensorTask`s it works on) and the registry of
methods by name. A method is one file: a `Method` subclass, registered with `register`.

This module imports nothing heavy at run time, so that a recipe's method can be looked up, and a
wrong one refused, before torch is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from mergecli.errors import RecipeError, UsageError

if TYPE_CHECKING:
    import torch

    from mergecli.io.checkpoint import Checkpoint
    from mergecli.io.safetensors import TensorSpec
    from mergecli.recipe import Recipe

    # (the input blocks, a buffer of the output dtype and the block's shape) → the merged block:
    # that buffer, filled, or another tensor that the streaming loop copies (and casts) into it
    Combine = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]

# Methods that ship with mergecli, as module names, imported the first time one is asked for (the
# module registers its method), like pytest's built-in plugins: the registry imports no method, and
# looking up a method never loads the others.
BUILTIN_METHODS = {"average": "mergecli.methods.average", "regmean": "mergecli.regmean.method"}
BLOCK_ELEMENTS = 2**18  # elements per row block a task reads: bounds memory for any tensor size, and
# keeps a block of three bf16 inputs and its merge (~2 MB) in a core's cache from read to write
_methods: dict[str, Method] = {}


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: read `out.name` from `sources`, `combine` each row block of
    them into a block of the output (written straight into the output buffer it is given, or
    returned to be copied there)."""

    out: TensorSpec
    kind: str  # "average" | "head" | "exclude" | "integer" | a method's own kind
    sources: tuple[Checkpoint, ...]
    combine: Combine
    block_elements: int = BLOCK_ELEMENTS
    work_bytes: int = 0  # memory `combine` itself allocates beyond the blocks (e.g. statistics it loads)
    # True: each row block is combined on its own, so blocks may run on several threads in any
    # order; False (a combine that keeps state from one block to the next): in order, on one thread
    independent_blocks: bool = False

    @property
    def bytes_read(self) -> int:
        return sum(source.tensors[self.out.name].nbytes for source in self.sources)


@dataclass
class Stage:
    """Tasks that run together, in order: `before` runs first (e.g. computes what their combines
    need), `after` gets the output written so far, as a checkpoint (e.g. to run the merged block);
    `work_bytes` is the memory the hooks themselves use."""

    tasks: list[TensorTask]
    before: Callable[[], None] | None = None
    after: Callable[[Checkpoint], None] | None = None
    cleanup: Callable[[], None] | None = None  # run when the merge ends, whether it succeeded or not
    work_bytes: int = 0


@dataclass
class Inputs:
    """The opened checkpoints of a recipe: `models` in recipe order, and the optional `base`."""

    models: list[Checkpoint]
    base: Checkpoint | None = None

    @property
    def reference(self) -> Checkpoint:
        """Where head, excluded and integer tensors, config and tokenizer come from."""
        return self.base or self.models[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    def close(self) -> None:
        for checkpoint in self.all:
            checkpoint.close()


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

    def stages(self, recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[Stage]:
        """The tasks in the order they run: one stage, unless later tensors are computed from earlier
        results (RegMean++ runs the merged blocks)."""
        return [Stage(self.tasks(recipe, inputs, tasks, warnings))]

    def label(self, recipe: Recipe) -> str:
        """What this recipe's merge is called ("RegMean++ merge"); `title` unless settings change it."""
        return self.title

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


def method_of(recipe: Recipe) -> Method:
    """The method a recipe names; an unknown one is a recipe error naming the recipe file.

    Raises:
        RecipeError: no method has that name.
    """
    try:
        return get_method(recipe.method)
    except UsageError:
        raise RecipeError(recipe.source, [f"method: unknown method {recipe.method!r}; methods: "
                                          f"{', '.join(method_names())}"]) from None
