"""Merge methods: the `Method` interface, the vocabulary methods work in (`TensorTask`, `Combine`,
`Stage`, `Inputs`, `copy_first`), and `register`, which makes a method available to recipes. A
method is one file (or one folder): a `Method` subclass that declares its settings, registered with
`register`; registry.py finds the built-in ones by name.

This module imports nothing heavy at run time, so that a recipe's method can be looked up, and a
wrong one refused, before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from mergecli.recipe import Recipe
from mergecli.recipe.dump import toml_value
from mergecli.recipe.varying import evaluate, varies

if TYPE_CHECKING:
    import torch

    from mergecli.io.checkpoint import Checkpoint
    from mergecli.io.remote import Fetcher
    from mergecli.io.safetensors import TensorSpec

# (the input blocks, a buffer of the output dtype and the block's shape[, the flat position of the block's
# first element, for a `positional` task]) → the merged block: that buffer, filled, or another tensor
# that the streaming loop copies (and casts) into it
Combine = Callable[..., "torch.Tensor"]


class Prepass:
    """A streamed read of a task's row blocks before its combine runs, for a statistic of the whole
    tensor (or of a population of tensors) that the combine needs: a magnitude threshold, a norm, a dot
    product. Blocks are folded in any order, on several threads at once. A subclass defines `needed`,
    `fold` and `task_done`; by default a pass reads every row block, once."""

    reads: float = 1.0  # the share of the tensor this pass is expected to read (for progress and --stream's notes)
    label: str = "a statistic of each tensor"  # what progress says the pass does

    def needed(self) -> bool:
        """Whether this pass has anything to do (a tie-break pass only when there are ties to break)."""
        raise NotImplementedError

    def rows(self, blocks: list[tuple[int, int] | None]) -> list[tuple[int, int] | None]:
        """The row ranges this pass reads, given the task's row blocks (None: the whole tensor): all of
        them, or a sample."""
        return blocks

    def fold(self, blocks: list[torch.Tensor], start: int) -> None:
        """Add one row block (every source's, in `sources` order) whose first element is at flat
        position `start`."""
        raise NotImplementedError

    def task_done(self) -> None:
        """Every block of the task was folded (called once per task, after its last fold)."""
        raise NotImplementedError

# A CPU core reads and sums about 1 GB/s from the page cache, and does some 30 GFLOP/s of float64
# linear algebra: for progress estimates, one byte read takes as long as about 30 flops.
FLOPS_PER_BYTE = 30
BLOCK_ELEMENTS = 2**18  # elements per row block a task reads: bounds memory for any tensor size, and
# keeps a block of three bf16 inputs and its merge (~2 MB) in a core's cache from read to write
registered: dict[str, Method] = {}  # by name: the built-in methods once asked for, and plugins


def copy_first(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The combine of a tensor taken as it is from its only source."""
    return blocks[0]


@dataclass(frozen=True)
class TensorSettings:
    """The recipe's settings for one tensor, every value a scalar (recipe/varying.py): the method's
    table, each model's own keys (the table's value where a model sets none), and each model's weight."""

    settings: Any
    models: list[Any]
    weights: list[float]


def _at(value: Any, tensor: str, t: float) -> Any:
    """A setting's value for one tensor; a table of values by model name is left for the model to pick."""
    return value if isinstance(value, dict) else evaluate(value, tensor, t)


def _evaluated(settings: BaseModel | None, tensor: str, t: float) -> BaseModel | None:
    """A method's table (or a model's keys) with every varying value evaluated for one tensor; a value no
    filter matched falls back to the key's default."""
    if settings is None:
        return None
    update = {}
    for key, declared in type(settings).model_fields.items():
        value = getattr(settings, key)
        if varies(value):
            found = evaluate(value, tensor, t)
            update[key] = found if found is not None else evaluate(declared.default, tensor, t)
    return settings.model_copy(update=update) if update else settings


def shown_value(value: Any) -> str:
    """A setting as the card and the plan show it: `0.5`, or a varying one as a recipe writes it."""
    return f"{value:g}" if isinstance(value, float) else toml_value(value) if isinstance(value, list) else str(value)


def settings_at(recipe: Recipe, tensor: str, t: float = 0.0, names: list[str] | None = None) -> TensorSettings:
    """The recipe's settings for the tensor `tensor` at position `t` among the layers (`names`: its name
    in each model, where slices rename it): shared settings are evaluated on its output name, a model's
    own keys on its name in that model, as mergekit evaluates them. A key a model's entry does not set
    (or whose filters miss the tensor) takes the method table's value for that model (a number, a
    varying value, or an entry of a table by model name), else its default."""
    names = names or [tensor] * len(recipe.models)
    table = recipe.settings
    models = []
    for spec, name in zip(recipe.models, names):
        own = spec.settings
        if own is None:
            models.append(None)
            continue
        update = {}
        for key, declared in type(own).model_fields.items():
            value = evaluate(getattr(own, key), name, t)
            if value is None and table is not None and key in type(table).model_fields:
                value = _at(getattr(table, key), name, t)
                if isinstance(value, dict):
                    value = evaluate(value.get(spec.name), name, t)
            update[key] = value if value is not None else evaluate(declared.default, name, t)
        models.append(own.model_copy(update=update))
    return TensorSettings(_evaluated(table, tensor, t), models, recipe.weights_at(tensor, t, names))


def varying_values(recipe: Recipe, tasks: list[TensorTask]) -> dict[str, dict[str, list[str]]]:
    """For each setting of the recipe that varies by tensor (`slerp.t`, `models.1.weight`), the value each
    group of the merged tensors gets: setting → shown value → tensor names (what validate and --dry-run
    show)."""
    table = recipe.settings
    keys = [(f"{recipe.method}.{declared.alias or key}", key, None) for key, declared in
            (type(table).model_fields.items() if table is not None else []) if varies(getattr(table, key))]
    for index, spec in enumerate(recipe.models):
        if varies(spec.weight):
            keys.append((f"models.{index}.weight", "weight", index))
        own = spec.settings
        for key, declared in (type(own).model_fields.items() if own is not None else []):
            table_value = getattr(table, key, None) if table is not None else None
            if varies(getattr(own, key)) or varies(table_value):
                keys.append((f"models.{index}.{declared.alias or key}", key, index))
    found: dict[str, dict[str, list[str]]] = {}
    for task in tasks:
        if task.kind in ("exclude", "head", "integer"):
            continue
        here = settings_at(recipe, task.out.name, task.t)
        for label, key, index in keys:
            value = here.weights[index] if key == "weight" and index is not None else \
                getattr(here.models[index] if index is not None else here.settings, key)
            found.setdefault(label, {}).setdefault(shown_value(value), []).append(task.out.name)
    return found


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
    cost: float = 0.0  # work beyond reading, in bytes read that take as long (a solve's flops / FLOPS_PER_BYTE)
    prepasses: tuple[Prepass, ...] = ()  # streamed reads before the combine (see Prepass), in order
    positional: bool = False  # the combine takes the flat position of each block's first element
    note: str = ""  # why the tensor is merged as it is, where the plan cannot show it by its kind alone
    t: float = 0.0  # its position among the layers, where settings given as gradients are evaluated

    @property
    def bytes_read(self) -> int:
        return sum(source.tensors[self.out.name].nbytes for source in self.sources)

    @property
    def work(self) -> float:
        """What progress and its time estimate count: the bytes read (by the prepasses expected to run,
        and once more to combine), plus the `cost` of computing."""
        return self.bytes_read * (1 + sum(prepass.reads for prepass in self.prepasses)) + self.cost


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
    label: str = ""  # what progress calls the stage ("block 3/12")
    hook_cost: float = 0.0  # the work of `before` and `after` (forward passes), in the units of TensorTask.work
    # tensor name → (kind, note) a combine chose as the stage ran, in place of its task's (RegMean++
    # averages an expert that saw too few tokens)
    decided: dict[str, tuple[str, str]] = field(default_factory=dict)

    def outcomes(self) -> list[tuple[str, str]]:
        """Each task's (kind, note), as planned or as decided while the stage ran."""
        return [self.decided.get(task.out.name, (task.kind, task.note)) for task in self.tasks]


@dataclass
class Inputs:
    """The opened checkpoints of a recipe: `models` in recipe order, and the optional `base`; and how
    this run uses them: `dry_run` (a plan only: nothing will be read, what a real run needs first,
    such as RegMean statistics, may be missing) and the `device` that models run on."""

    models: list[Checkpoint]
    base: Checkpoint | None = None
    dry_run: bool = False
    device: str = "cpu"
    fetcher: Fetcher | None = None  # `--stream`: what reads the hub inputs by range requests
    # per vocabulary tensor, the output rows the base lacks (tokens only the models have): for them a
    # task-vector method gives the weighted mean of the models' rows, as a linear merge does
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def reference(self) -> Checkpoint:
        """Where head, excluded and integer tensors, config and tokenizer come from."""
        return self.base or self.models[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    def close(self) -> None:
        if self.fetcher is not None:
            self.fetcher.close()
        for checkpoint in self.all:
            checkpoint.close()


class Method:
    """What a merge method is, to the rest of mergecli.

    The planner builds one default task per output tensor (averaged, or copied from the reference
    model: head, excluded and integer tensors) and hands them to `tasks`; `validate`, `--dry-run`,
    the summary and the model card describe the result with `title`, `kinds` and `describe`.

    A method declares its recipe keys as pydantic models (strict: `recipe.StrictModel`): `settings`,
    the table named after it (`[ties] density = 0.5`), and `model_settings`, the keys it adds to a
    `[[models]]` entry (`density = 0.7`). `method_of` validates them; the method reads them back as
    `recipe.settings` and `recipe.models[i].settings`.
    """

    name: ClassVar[str]  # `method = "..."` in a recipe
    title: ClassVar[str]  # what the card, the summary and a push's commit call it: "weighted average"
    help: ClassVar[str] = ""  # one line for `--help` and `validate`: what it does
    mergekit: ClassVar[str | tuple[str, ...]] = ()  # mergekit's `merge_method` name(s) for it, for `convert`
    # mergekit's defaults where they differ from this method's (`convert` writes them out), and mergekit
    # parameters with no effect on the result (how it holds masks in memory)
    mergekit_defaults: ClassVar[dict[str, object]] = {}
    mergekit_ignored: ClassVar[frozenset[str]] = frozenset({"int8_mask"})
    command: ClassVar[str] = "merge"  # the `mergecli` command that runs it: "merge" or "regmean merge"
    settings: ClassVar[type[BaseModel] | None] = None  # its table, `[<name>]`
    model_settings: ClassVar[type[BaseModel] | None] = None  # the keys it adds to a [[models]] entry
    normalize_default: ClassVar[bool] = True  # `normalize` when the recipe does not say
    copies_one_model: ClassVar[bool] = False  # a merge of one model is a copy of it (the plan says so)
    kinds: ClassVar[dict[str, str]] = {}  # summary labels of the task kinds it adds

    def normalize(self, recipe: Recipe) -> bool:
        """Whether the models' weighted sum is divided by the sum of their weights."""
        return recipe.normalize if recipe.normalize is not None else self.normalize_default

    def weights(self, recipe: Recipe) -> list[float]:
        """The models' weights (those of the tensors outside the layers, where they vary), normalized
        when the method divides by their sum."""
        return recipe.weights(normalize=self.normalize(recipe))

    def shown_weights(self, recipe: Recipe) -> list[str]:
        """The models' weights as the card and the plan show them: `weights`, or as written where they
        vary by tensor."""
        if recipe.weights_vary:
            return [shown_value(spec.weight) for spec in recipe.models]
        return [f"{weight:.4g}" for weight in self.weights(recipe)]

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
    registered[method.name] = method
    return method
