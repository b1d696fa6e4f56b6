"""Planning: open and check every input's headers, let the recipe's method decide each output
tensor's task, and lay out the output shards. Nothing is read yet, so a plan is also what
`validate` and `--dry-run` print.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mergecli.errors import CheckpointError, ShapeMismatchError, UsageError
from mergecli.io.architecture import loaded_keys, unloaded
from mergecli.io.atomic import check_output_path, recover
from mergecli.io.checkpoint import Checkpoint, open_checkpoint
from mergecli.io.writer import ShardPlan, plan_shards
from mergecli.merge.stream import peak_memory
from mergecli.merge.support import SupportFiles, plan_support
from mergecli.merge.tasks import default_tasks
from mergecli.methods.base import Inputs, Method, Stage, TensorTask
from mergecli.methods.registry import method_of
from mergecli.recipe import Recipe, model_label


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
    support: SupportFiles
    warnings: list[str] = field(default_factory=list)
    sync: bool = True  # the output reaches the disk before it is put in place (--no-sync: not)

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
    def work(self) -> float:
        """All the work of the merge, in the units of `TensorTask.work` (what progress counts)."""
        return sum(task.work for task in self.tasks) + sum(stage.hook_cost for stage in self.stages)

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


def open_inputs(recipe: Recipe, *, headers_only: bool = False) -> Inputs:
    """Open every model of the recipe (and the base); close them all if one fails.

    Args:
        headers_only: hub inputs are known from their headers, their weights not downloaded.
    """
    opened: list[Checkpoint] = []
    try:
        base = (open_checkpoint(recipe.base.path, revision=recipe.base.revision, headers_only=headers_only)
                if recipe.base else None)
        if base:
            opened.append(base)
        for spec in recipe.models:
            opened.append(open_checkpoint(spec.path, revision=spec.revision, headers_only=headers_only))
    except BaseException:
        for checkpoint in opened:
            checkpoint.close()
        raise
    return Inputs(models=opened[1:] if base else opened, base=base)


def _label(recipe: Recipe, inputs: Inputs, checkpoint: Checkpoint) -> str:
    return "base" if checkpoint is inputs.base else recipe.models[inputs.models.index(checkpoint)].name


def _architecture(checkpoint: Checkpoint) -> str | None:
    """`llama (LlamaForCausalLM)`, from the checkpoint's config.json; None without one."""
    try:
        config = json.loads((checkpoint.directory / "config.json").read_text()) if checkpoint.directory else None
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    kind, classes = config.get("model_type"), ", ".join(map(str, config.get("architectures") or []))
    return f"{kind} ({classes})" if classes else str(kind) if kind else None


def unloaded_tensors(inputs: Inputs, names: list[str], differing: set[str]) -> set[str]:
    """Tensors that transformers does not load for the reference's class (non-persistent or obsolete
    buffers); asked only when the inputs disagree on names or hold buffer-like (integer) tensors."""
    reference = inputs.reference
    buffer_like = any(not info.dtype.is_floating_point or info.name.endswith(("inv_freq", "masked_bias"))
                      for c in inputs.all for info in c.tensors.values())
    if not (differing or buffer_like) or reference.directory is None:
        return set()
    expected = loaded_keys(reference.directory)
    return unloaded(set(names), expected) if expected is not None else set()


def check_compatible(recipe: Recipe, inputs: Inputs, warnings: list[str]) -> set[str]:
    """Every input must hold the same tensor names and shapes; list every mismatch. Tensors matching
    `exclude` need only be in the reference; tensors transformers does not load are dropped.

    Returns:
        The tensors dropped from the output.
    """
    everyone = inputs.all
    names = list(dict.fromkeys(n for c in everyone for n in c.tensors))
    differing = {n for n in names if any(n not in c.tensors for c in everyone)}
    dropped = unloaded_tensors(inputs, names, differing)
    if dropped:
        shown = ", ".join(sorted(dropped)[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        count = f"{len(dropped)} tensor{'s' * (len(dropped) != 1)}"
        warnings.append(f"dropped {count} that transformers does not load for this model "
                        f"(buffers it no longer saves): {shown}")
    excluded = [re.compile(p) for p in recipe.exclude]
    problems = []
    for name in names:
        if name in dropped:
            continue
        holders = [inputs.reference] if any(p.fullmatch(name) for p in excluded) else everyone
        missing = [_label(recipe, inputs, c) for c in holders if name not in c.tensors]
        if missing:
            problems.append(f"{name}: missing in {', '.join(missing)}")
            continue
        infos = [c.tensors[name] for c in holders]
        if len({i.shape for i in infos}) > 1:
            shapes = ", ".join(f"{_label(recipe, inputs, c)} {list(c.tensors[name].shape)}" for c in holders)
            problems.append(f"{name}: shapes differ: {shapes}")
        elif len({i.dtype.is_floating_point for i in infos}) > 1:
            dtypes = ", ".join(f"{_label(recipe, inputs, c)} {c.tensors[name].dtype}" for c in holders)
            problems.append(f"{name}: floating and integer dtypes mixed: {dtypes}")
    if problems:
        kinds = {_label(recipe, inputs, c): _architecture(c) for c in everyone}
        mixed = len({k for k in kinds.values() if k}) > 1
        raise ShapeMismatchError(problems, architectures=", ".join(f"{label} is {kind}" for label, kind
                                                                  in kinds.items()) if mixed else None)
    return dropped


def input_paths(inputs: Inputs) -> list[Path]:
    return [c.directory or c.files[0] for c in inputs.all]


def resolve_output(recipe: Recipe, output: Path | str | None) -> Path:
    target = output if output is not None else recipe.output
    if target is None:
        raise UsageError("no output directory", hint="set `output` in the recipe or pass -o DIR")
    return Path(os.path.abspath(Path(target).expanduser()))  # a link is not followed: it is refused


def inputs_order(stages: list[Stage], inputs: Inputs) -> list[TensorTask]:
    """The tasks in the reference checkpoint's tensor order, whatever order they run in: the output
    is laid out like the input."""
    position = {name: i for i, name in enumerate(inputs.reference.tensors)}
    return sorted((task for stage in stages for task in stage.tasks), key=lambda t: position.get(t.out.name, 0))


def check_digests(recipe: Recipe, inputs: Inputs) -> None:
    """Refuse inputs that are not the checkpoints the recipe recorded (`digest`, written into every
    output's mergecli.toml)."""
    specs = ([("base", recipe.base, inputs.base)] if recipe.base else []) + [
        (model_label(i, spec), spec, ckpt) for i, (spec, ckpt) in enumerate(zip(recipe.models, inputs.models))]
    for label, spec, checkpoint in specs:
        if spec.digest and checkpoint.digest() != spec.digest:
            raise CheckpointError(checkpoint.source, f"{label}: its digest is {checkpoint.digest()[:19]}…, the recipe "
                                                     f"records {spec.digest[:19]}…; it is not the checkpoint "
                                                     "the recipe was written for",
                                  hint="point the recipe at that checkpoint, or remove its `digest` to accept this one")


def plan_merge(recipe: Recipe, *, output: Path | str | None = None, force: bool = False,
               dry_run: bool = False, sync: bool = True, device: str = "cpu") -> MergePlan:
    """Open and check the inputs of a recipe, let its method plan every tensor, and lay out the
    output; read no tensor. Unless `dry_run`, first restore or remove what killed runs left beside
    the output (said in the plan's warnings). With `dry_run`, hub inputs are planned from their
    safetensors headers (range requests): no weights are downloaded.

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
    recovered = [] if dry_run else recover(target)
    inputs = open_inputs(recipe, headers_only=dry_run)
    inputs.dry_run, inputs.device = dry_run, device
    try:
        warnings: list[str] = list(recovered)
        dropped = check_compatible(recipe, inputs, warnings)
        check_digests(recipe, inputs)
        specs = [*([recipe.base] if recipe.base else []), *recipe.models]
        warnings += [f"{spec.path}: no such local path, so it was taken from the Hugging Face Hub"
                     for spec, checkpoint in zip(specs, inputs.all) if checkpoint.commit and "/" not in spec.path]
        ignored = [name for name in recipe.tables if name != recipe.method]
        if ignored:
            warnings.append(f"the recipe's {', '.join(f'[{name}]' for name in ignored)} "
                            f"{'is' if len(ignored) == 1 else 'are'} not read: its method is {recipe.method}")
        defaults = default_tasks(recipe, inputs, warnings, dropped, normalize=method.normalize(recipe))
        stages = method.stages(recipe, inputs, defaults, warnings)
        check_output_path(target, input_paths(inputs), force=force)
        shards = plan_shards([task.out for task in inputs_order(stages, inputs)], recipe.shard_size)
        support = plan_support(recipe, inputs, warnings)
        return MergePlan(recipe, method, target, force, inputs, stages, shards, support, warnings, sync)
    except BaseException:
        inputs.close()
        raise
