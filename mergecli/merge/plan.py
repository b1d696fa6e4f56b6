"""Planning: open and check every input's headers, let the recipe's method decide each output
tensor's task, and lay out the output shards. Nothing is read yet, so a plan is also what
`validate` and `--dry-run` print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergecli.errors import ShapeMismatchError, UsageError
from mergecli.io.atomic import check_output_path
from mergecli.io.checkpoint import Checkpoint, open_checkpoint
from mergecli.io.writer import ShardPlan, plan_shards
from mergecli.merge.stream import peak_memory
from mergecli.merge.tasks import default_tasks
from mergecli.methods.base import Inputs, Method, Stage, TensorTask, method_of
from mergecli.recipe import Recipe


@dataclass
class MergePlan:
    """Everything decided before the first tensor is read."""

    recipe: Recipe
    method: Method
    output: Path
    force: bool
    inputs: Inputs
    stages: list[Stage]
    shards: list[ShardPlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[TensorTask]:
        return [task for stage in self.stages for task in stage.tasks]

    @property
    def reference_name(self) -> str:
        """How the summary names the reference model: "base", else the first model's name."""
        return "base" if self.inputs.base else self.recipe.models[0].name

    @property
    def bytes_read(self) -> int:
        return sum(task.bytes_read for task in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(shard.size for shard in self.shards)

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes above the interpreter while streaming."""
        return max(peak_memory(self.tasks), *(stage.work_bytes for stage in self.stages))

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.kind] = counts.get(task.kind, 0) + 1
        return counts


def open_inputs(recipe: Recipe) -> Inputs:
    """Open every model of the recipe (and the base); close them all if one fails."""
    opened: list[Checkpoint] = []
    try:
        base = open_checkpoint(recipe.base.path, revision=recipe.base.revision) if recipe.base else None
        if base:
            opened.append(base)
        for spec in recipe.models:
            opened.append(open_checkpoint(spec.path, revision=spec.revision))
    except BaseException:
        for checkpoint in opened:
            checkpoint.close()
        raise
    return Inputs(models=opened[1:] if base else opened, base=base)


def check_compatible(recipe: Recipe, inputs: Inputs) -> None:
    """Every input must hold the same tensor names and shapes; list every mismatch."""

    def label(checkpoint: Checkpoint) -> str:
        return "base" if checkpoint is inputs.base else recipe.models[inputs.models.index(checkpoint)].name

    problems = []
    everyone = inputs.all
    names = list(dict.fromkeys(n for c in everyone for n in c.tensors))
    for name in names:
        missing = [label(c) for c in everyone if name not in c.tensors]
        if missing:
            problems.append(f"{name}: missing in {', '.join(missing)}")
            continue
        infos = [c.tensors[name] for c in everyone]
        if len({i.shape for i in infos}) > 1:
            shapes = ", ".join(f"{label(c)} {list(c.tensors[name].shape)}" for c in everyone)
            problems.append(f"{name}: shapes differ: {shapes}")
        elif len({i.dtype.is_floating_point for i in infos}) > 1:
            dtypes = ", ".join(f"{label(c)} {c.tensors[name].dtype}" for c in everyone)
            problems.append(f"{name}: floating and integer dtypes mixed: {dtypes}")
    if problems:
        raise ShapeMismatchError(problems)


def input_paths(inputs: Inputs) -> list[Path]:
    return [c.directory or c.files[0] for c in inputs.all]


def resolve_output(recipe: Recipe, output: Path | str | None) -> Path:
    target = output if output is not None else recipe.output
    if target is None:
        raise UsageError("no output directory", hint="set `output` in the recipe or pass -o DIR")
    return Path(target).expanduser().resolve()


def inputs_order(stages: list[Stage], inputs: Inputs) -> list[TensorTask]:
    """The tasks in the reference checkpoint's tensor order, whatever order they run in: the output
    is laid out like the input."""
    position = {name: i for i, name in enumerate(inputs.reference.tensors)}
    return sorted((task for stage in stages for task in stage.tasks), key=lambda t: position.get(t.out.name, 0))


def plan_merge(recipe: Recipe, *, output: Path | str | None = None, force: bool = False) -> MergePlan:
    """Open and check the inputs of a recipe, let its method plan every tensor, and lay out the
    output; read no tensor.

    Raises:
        UsageError: unknown method, no output, output exists (without `force`) or overlaps an input.
        InputNotFoundError, CheckpointError, ShapeMismatchError: bad inputs.
        The method's own errors (e.g. StatsError: RegMean statistics missing or stale).

    Example:
        >>> plan = plan_merge(load_recipe("recipes/demo-average.toml"))
        >>> report = run_merge(plan)
    """
    method = method_of(recipe)
    method.check(recipe)
    target = resolve_output(recipe, output)
    inputs = open_inputs(recipe)
    try:
        check_compatible(recipe, inputs)
        warnings: list[str] = []
        stages = method.stages(recipe, inputs, default_tasks(recipe, inputs, warnings), warnings)
        check_output_path(target, input_paths(inputs), force=force)
        shards = plan_shards([task.out for task in inputs_order(stages, inputs)], recipe.shard_size)
        return MergePlan(recipe, method, target, force, inputs, stages, shards, warnings)
    except BaseException:
        inputs.close()
        raise
