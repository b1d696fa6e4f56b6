"""Planning: open and check every input's headers, let the recipe's method decide each output
tensor's task, and lay out the output shards. Nothing is read yet, so a plan is also what
`validate` and `--dry-run` print.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import InputNotFoundError, UsageError
from mergecli.io.adapter_bases import with_bases
from mergecli.io.atomic import check_output_path, output_directory, partial_directory, recover, resumable
from mergecli.io.blocks import block_of, renumbered
from mergecli.io.checkpoint import Checkpoint, open_checkpoint
from mergecli.io.fp8 import Fp8Output
from mergecli.io.remote import Fetcher
from mergecli.io.writer import ShardPlan, plan_shards
from mergecli.merge.compatible import check_compatible, check_digests, check_nothing_lost
from mergecli.merge.job import Job
from mergecli.merge.slices import is_pre, plan_slices
from mergecli.merge.stages import planned_checkpoint, stage_directory
from mergecli.merge.stream import peak_memory
from mergecli.merge.support import SupportFiles, plan_support
from mergecli.merge.tasks import default_tasks, fp8_output
from mergecli.merge.vocabulary import plan_vocabulary
from mergecli.methods.base import Inputs, Method, Stage, TensorTask, varying_values
from mergecli.recipe import Recipe, model_label
from mergecli.recipe.schema import STAGE


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
    notes: list[str] = field(default_factory=list)  # what is expected but worth a word (a dropped buffer)
    sync: bool = True  # the output reaches the disk before it is put in place (--no-sync: not)
    stage_plans: list[MergePlan] = field(default_factory=list)  # the recipe's stages, written first (scratch)
    varying: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # setting → value → tensors
    fp8: Fp8Output | None = None  # the tensors written fp8 block-scaled (requantized from the float32 merge)
    resume_from: Path | None = None  # a killed run's temporary directory whose finished shards are kept

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
        """All the work of the merge (its stages' too), in the units of `TensorTask.work` (what progress
        counts)."""
        return (sum(task.work for task in self.tasks) + sum(stage.hook_cost for stage in self.stages)
                + sum(plan.work for plan in self.stage_plans))

    @property
    def bytes_written(self) -> int:
        return sum(shard.size for shard in self.shards)

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes above the interpreter while streaming (with `--stream`, its read-ahead)."""
        read_ahead = self.recipe.stream_buffer if self.recipe.stream else 0
        return max(peak_memory(self.tasks), *(stage.work_bytes for stage in self.stages)) + read_ahead

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for stage in self.stages:
            for kind, _ in stage.outcomes():
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def task_notes(self) -> dict[str, list[str]]:
        """Per task kind, the notes of its tasks (which tensors, and why), for the card."""
        notes: dict[str, list[str]] = {}
        for stage in self.stages:
            for kind, note in stage.outcomes():
                if note:
                    notes.setdefault(kind, []).append(note)
        return notes


def open_inputs(recipe: Recipe, *, headers_only: bool = False, fetcher: Fetcher | None = None,
                stages: dict[str, Checkpoint] | None = None) -> Inputs:
    """Open every model of the recipe (and the base); close them all if one fails.

    Args:
        headers_only: hub inputs are known from their headers, their weights not downloaded.
        fetcher: with `--stream`, the one a head start began (io/head_start.py); else a new one.
        stages: the earlier stages' outputs, by name, for the inputs that name one (`stage:NAME`).
    """
    if recipe.stream and fetcher is None:
        fetcher = Fetcher(connections=recipe.stream_connections, buffer=recipe.stream_buffer)
    specs = recipe.input_specs

    def opened(spec: Any) -> Checkpoint:
        if spec.path.startswith(STAGE):
            return (stages or {})[spec.path.removeprefix(STAGE)]
        return open_checkpoint(spec.path, revision=spec.revision, headers_only=headers_only, fetcher=fetcher)

    with ThreadPoolExecutor(max_workers=min(8, len(specs))) as pool:  # hub inputs resolve side by side
        futures = [pool.submit(opened, spec) for spec in specs]
        wait(futures)
    opened: list[Checkpoint] = [future.result() for future in futures if future.exception() is None]
    failure = next((future.exception() for future in futures if future.exception() is not None), None)
    if failure is not None:  # the first failing input, in recipe order
        for checkpoint in opened:
            checkpoint.close()
        if fetcher is not None:
            fetcher.close()
        if isinstance(failure, InputNotFoundError) and recipe.output is not None and recipe.base_dir is not None \
                and Path(recipe.output) == recipe.base_dir:
            failure.hint = ("this is the mergecli.toml of a merge output: its paths are relative to the output "
                            "directory; if the output was moved, point them at the inputs again "
                            "(--set models.N.path=PATH)")
        raise failure
    base = opened[0] if recipe.base else None
    try:
        opened = with_bases(specs, opened, base, headers_only=headers_only, fetcher=fetcher)
    except BaseException:
        for checkpoint in opened:
            checkpoint.close()
        raise
    base = opened[0] if recipe.base else None
    return Inputs(models=opened[1:] if base else opened, base=base, fetcher=fetcher if not headers_only else None)


def stream_notes(recipe: Recipe, inputs: Inputs, stages: list[Stage]) -> list[str]:
    """What `--stream` will fetch: which inputs, how many times each (a method's prepasses read again)."""
    streamed = [(label, checkpoint) for label, checkpoint in zip(recipe.input_labels, inputs.all)
                if checkpoint.commit and any(not file.is_file() for file in checkpoint.files)]
    if not streamed:
        return ["--stream: no input is fetched from the Hub (local, or complete in the cache)"]
    tasks = [task for stage in stages for task in stage.tasks]
    fetched, again = [], []
    for label, checkpoint in streamed:
        mine = [(task.out.name, 1 + sum(prepass.reads for prepass in task.prepasses)) for task in tasks
                if any(getattr(s, "checkpoint", s) is checkpoint for s in task.sources)]
        size = sum(checkpoint.tensors[name].nbytes for name, _ in mine)
        reads = sum(checkpoint.tensors[name].nbytes * times for name, times in mine) / size if size else 0
        fetched.append(label)
        if reads > 1:
            again.append(f"{label} about {reads:.2g} times")
    times = "" if not again else f"; bytes are fetched again where the method reads them in passes before it " \
                                 f"merges ({', '.join(again)}), since nothing is stored between them"
    return [f"--stream: {', '.join(fetched)} read from the Hub by range requests, nothing of them stored "
            f"(read-ahead at most {recipe.stream_buffer / 2**20:.0f} MiB){times}"]


def input_paths(inputs: Inputs) -> list[Path]:
    return [c.directory or c.files[0] for c in inputs.all]


def output_order(stages: list[Stage], inputs: Inputs, *, sliced: bool = False) -> list[TensorTask]:
    """The tasks in the order the output lays them out, whatever order they run in: the reference
    checkpoint's tensor order; with slices, the tensors before the layers, the layers in the output's
    order (each laid out as the reference lays out its layers), then the tensors after them."""
    tasks = [task for stage in stages for task in stage.tasks]
    if not sliced:
        position = {name: i for i, name in enumerate(inputs.reference.tensors)}
        return sorted(tasks, key=lambda t: position.get(t.out.name, 0))
    within = {renumbered(name, 0): i for i, name in enumerate(inputs.reference.tensors)}

    def key(task: TensorTask) -> tuple:
        block = block_of(task.out.name)
        if block is None:
            return (0 if is_pre(task.out.name) else 2, 0, task.out.name)
        return (1, block[1], within.get(renumbered(task.out.name, 0), 0))

    return sorted(tasks, key=key)


def _sliced(job: Job, inputs: Inputs, warnings: list[str], notes: list[str]) -> tuple[
        list[Stage], set[str], list[tuple[int, int]], list[tuple[Recipe, list[TensorTask]]]]:
    """A recipe with slices: each slice planned as a merge of its own sources (merge/slices.py). Returns
    the stages, the tensors dropped (buffers transformers does not load), each output layer's source
    (its input's index in `inputs.all`, its layer there), and each slice's recipe and default tasks."""
    stages, dropped, layers, sliced = [], set(), [], []
    for piece in plan_slices(job.recipe, inputs, job.slices):
        lost = check_compatible(piece.recipe, piece.inputs, notes)
        defaults = default_tasks(piece.recipe, piece.inputs, warnings, lost,
                                 normalize=job.bound.normalize(piece.recipe), places=piece.places)
        stages += job.bound.stages(piece.recipe, piece.inputs, defaults, warnings)
        dropped |= lost
        layers += piece.layers
        sliced.append((piece.recipe, defaults))
    return stages, dropped, layers, sliced


def plan_merge(job: Job | Recipe, *, output: Path | str | None = None, force: bool = False,
               dry_run: bool = False, sync: bool = True, device: str = "cpu", resume: bool = False) -> MergePlan:
    """Open and check the inputs of a recipe, let its method plan every tensor, and lay out the
    output; read no tensor. Unless `dry_run`, first restore or remove what killed runs left beside
    the output (said in the plan's warnings). With `dry_run`, hub inputs are planned from their
    safetensors headers (range requests): no weights are downloaded.

    Args:
        job: a recipe bound to its method (merge/job.py), or a recipe, which is bound here.
        resume: carry on in what a killed run of this output left (`--resume`: io/resume.py).

    Raises:
        UsageError: unknown method, no output, output exists (without `force`) or overlaps an input.
        RecipeError: a key the method refuses.
        InputNotFoundError, CheckpointError, ShapeMismatchError: bad inputs.
        The method's own errors (e.g. StatsError: RegMean statistics missing or stale).

    Example:
        >>> plan = plan_merge(load_recipe("recipes/demo-average.toml"))
        >>> report = run_merge(plan)
    """
    if isinstance(job, Recipe):
        job = Job(job).bind()
    target = output_directory(output if output is not None else job.recipe.output)
    resume_from = resumable(target) if resume else None
    if resume and (resume_from is None or job.stages):
        why = "a recipe with stages does not resume" if job.stages else f"no interrupted merge of {target} was found"
        raise UsageError(f"--resume: {why}", hint="run the merge without --resume")
    recovered = [] if dry_run else recover(target, keep=resume_from)
    stage_plans, planned = [], {}
    try:
        for stage in job.stages:
            name = stage.recipe.name
            stage_plans.append(_plan(stage, stage_directory(partial_directory(target), name), scratch=True,
                                     dry_run=dry_run, sync=sync, device=device, stages=planned))
            planned[name] = planned_checkpoint(name, stage_plans[-1])
        plan = _plan(job, target, force=force, dry_run=dry_run, sync=sync, device=device, stages=planned)
    except BaseException:
        for stage_plan in stage_plans:
            stage_plan.inputs.close()
        raise
    plan.notes[:0] = recovered
    plan.stage_plans = stage_plans
    plan.resume_from = resume_from
    return plan


def quantized_notes(recipe: Recipe, inputs: Inputs, fp8: Fp8Output | None) -> list[str]:
    """What --dry-run and the report say of quantized inputs (dequantized as read) and an fp8 output."""
    notes = []
    for name, checkpoint in zip(recipe.input_names, inputs.all):
        formats: dict[str, int] = {}
        for decoder in getattr(checkpoint, "decoders", {}).values():
            formats[decoder.info.stored_as] = formats.get(decoder.info.stored_as, 0) + 1
        for stored_as, count in formats.items():
            notes.append(f"{name}: its {stored_as} adapter is applied to {count} tensors of its base as they are read"
                         if stored_as in ("LoRA", "DoRA") else
                         f"{name}: {count} tensors stored as {stored_as} are dequantized as they are read")
    if fp8 is not None and fp8.names:
        notes.append(f"{len(fp8.names)} tensors are written as fp8 e4m3 with a scale per {fp8.tile[0]}×{fp8.tile[1]} "
                     "block, requantized from the float32 merge; the rest as bfloat16")
    return notes


def plan_unwritten(recipe: Recipe, *, device: str = "cpu") -> MergePlan:
    """A merge planned to be computed, never written (`mergecli eval`): no output path, no stages."""
    job = Job(recipe).bind()
    if job.stages:
        raise UsageError("a recipe with stages is not evaluated yet", hint="evaluate each stage's recipe")
    return _plan(job, Path(recipe.base_dir or ".") / ".mergecli-eval", dry_run=False, sync=False, device=device,
                 stages={}, scratch=True)


def planned_fp8(recipe: Recipe, inputs: Inputs, outputs: list) -> Fp8Output | None:
    """The output tensors written fp8 block-scaled (merged in float32: tasks.output_dtype), if any."""
    fp8 = fp8_output(recipe, inputs.reference)
    if fp8 is None:
        return None
    merged_in_float32 = {spec.name for spec in outputs if spec.dtype == torch.float32}
    return Fp8Output(fp8.tile, fp8.names & merged_in_float32, fp8.settings)


def _plan(job: Job, target: Path, *, force: bool = False, dry_run: bool, sync: bool, device: str,
          stages: dict[str, Checkpoint], scratch: bool = False) -> MergePlan:
    """One merge planned (the recipe's, or one of its stages', into `scratch` inside the output's
    temporary directory)."""
    recipe, method = job.recipe, job.bound
    recovered: list[str] = []
    inputs = open_inputs(recipe, headers_only=dry_run, fetcher=job.fetcher(), stages=stages)
    inputs.dry_run, inputs.device = dry_run, device
    try:
        warnings: list[str] = []
        notes: list[str] = list(recovered)
        vocabulary = plan_vocabulary(recipe, inputs, notes)
        if vocabulary is not None:
            inputs = vocabulary.views(inputs)
        if recipe.slices:
            stages, dropped, layers, sliced = _sliced(job, inputs, warnings, notes)
        else:
            dropped, layers = check_compatible(recipe, inputs, notes), None
        check_digests(recipe, inputs)
        notes += [f"{spec.path}: no such local path, so it was taken from the Hugging Face Hub"
                  for spec, checkpoint in zip(recipe.input_specs, inputs.all)
                  if checkpoint.commit and "/" not in spec.path]
        notes += [f"{model_label(i, spec)} has weight 0: it is not read, and counts only in the sum of the weights"
                  for i, spec in enumerate(recipe.models) if spec.weight == 0]
        if len(recipe.models) == 1 and method.copies_one_model and not recipe.slices:
            notes.append("one model: the output is a copy of it, in the output dtype")
        ignored = [name for name in recipe.tables if name != recipe.method]
        if ignored:
            warnings.append(f"the recipe's {', '.join(f'[{name}]' for name in ignored)} "
                            f"{'is' if len(ignored) == 1 else 'are'} not read: its method is {recipe.method}")
        if not recipe.slices:
            defaults = default_tasks(recipe, inputs, warnings, dropped, normalize=method.normalize(recipe))
            stages = method.stages(recipe, inputs, defaults, warnings)
            varying = varying_values(recipe, defaults)
        else:
            varying = {f"slices.{number}.{key}": values for number, (sub, tasks) in enumerate(sliced)
                       for key, values in varying_values(sub, tasks).items()}
        check_nothing_lost(inputs, [task.out for stage in stages for task in stage.tasks], dropped)
        if recipe.stream:
            notes += stream_notes(recipe, inputs, stages)
        if not scratch:
            check_output_path(target, input_paths(inputs), force=force)
        outputs = [task.out for task in output_order(stages, inputs, sliced=bool(recipe.slices))]
        fp8 = None if scratch else planned_fp8(recipe, inputs, outputs)
        notes += quantized_notes(recipe, inputs, fp8)
        shards = plan_shards(fp8.stored(outputs) if fp8 else outputs, recipe.shard_size)
        support = plan_support(recipe, inputs, warnings, vocabulary, layers=layers)
        return MergePlan(recipe, method, target, force, inputs, stages, shards, support, warnings, notes, sync,
                         varying=varying, fp8=fp8)
    except BaseException:
        inputs.close()
        raise
