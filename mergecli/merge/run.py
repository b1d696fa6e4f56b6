"""Running a plan: check the disk, stream every task into an atomic output directory, add the
support files, and report what was done.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.errors import MergecliError
from mergecli.io.atomic import atomic_directory
from mergecli.io.resume import finished_shards, forget, record_shard
from mergecli.io.writer import ShardWriter
from mergecli.merge.lora_extract import DEFAULT_LORA_RANK, AdapterWriter, LoraSink
from mergecli.merge.lora_run import base_name
from mergecli.merge.plan import MergePlan
from mergecli.merge.ranks import write_on_ranks
from mergecli.merge.stream import NonFinite, stream_tasks
from mergecli.merge.support import resolved_recipe, with_stages, write_support_files
from mergecli.methods.base import Stage
from mergecli.recipe import Recipe
from mergecli.recipe.dump import dump_recipe
from mergecli.stats.collect import process_rank


def config_dtype(plan: MergePlan) -> str:
    """The output's floating dtype, as config.json names it: the most common among its tensors."""
    if plan.fp8 is not None and plan.fp8.names:
        return "bfloat16"  # as DeepSeek's and Qwen's fp8 releases say: the dtype of what is not fp8
    dtypes = [t.out.dtype for t in plan.tasks if t.out.dtype.is_floating_point]
    common = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    return str(common).removeprefix("torch.")


MergeProgress = Callable[[int, float, str], None]  # (tensors done, work done, the stage running)


class Progress:
    """Adds up the stages' progress since the merge started: tensors done, and the work done (bytes
    read, solves and forward passes, in the units of `TensorTask.work`), for an estimate of the time
    left that follows the work rather than the bytes."""

    def __init__(self, callback: MergeProgress | None):
        self.callback = callback
        self.tensors, self.work = 0, 0.0
        self.stage = (0, 0.0)
        self.label = ""

    def update(self, tensors: int, work: float, step: str = "") -> None:
        """The running stage's tensors done and work done, and the pass it is in (a prepass names itself)."""
        self.stage = (tensors, work)
        if self.callback:
            label = "; ".join(filter(None, (self.label, step)))
            self.callback(self.tensors + tensors, self.work + work, label)

    def start(self, stage: Stage) -> None:
        self.label = stage.label
        self.update(0, 0.0)

    def advance(self, work: float) -> None:
        """Work done outside the stream (a stage's forward passes)."""
        self.work += work
        self.update(*self.stage)

    def stage_done(self) -> None:
        self.tensors += self.stage[0]
        self.work += self.stage[1]
        self.stage = (0, 0.0)


@dataclass(frozen=True)
class MergeReport:
    output: Path
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    counts: dict[str, int]
    warnings: list[str]
    notes: list[str]
    fetched: dict[str, int] = field(default_factory=dict)  # `--stream`: bytes fetched from the Hub, per input


def check_disk_space(plan: MergePlan) -> None:
    """Fail before anything is written when the output's file system cannot hold the output."""
    parent = next((p for p in [plan.output, *plan.output.parents] if p.exists()), None)
    if parent is None:
        return
    free = shutil.disk_usage(parent).free
    if free < plan.bytes_written:
        raise MergecliError(
            f"not enough disk space for {plan.output}: the merge writes {plan.bytes_written / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free", hint="free some space or choose another output directory")


def run_merge(plan: MergePlan, *, on_progress: MergeProgress | None = None) -> MergeReport:
    """Stream the planned merge into the output directory, atomically; a recipe's stages first, each into
    scratch inside the output's temporary directory, removed before the output is put in place.

    Returns:
        A `MergeReport` (output path, sizes, time, what was done to how many tensors, warnings).

    Raises:
        MergecliError: not enough disk space, or a read / write failure (nothing is left behind).
    """
    started = time.perf_counter()
    plans = [*plan.stage_plans, plan]
    if process_rank()[1] > 1:  # under torchrun: the ranks split the shards (merge/ranks.py)
        check_disk_space(plan)
        recipe = resolved_plan_recipe(plan)
        done = Progress(on_progress)
        write_on_ranks(plan, recipe, lambda directory: write_support(plan, directory, recipe), done.update)
        return MergeReport(plan.output, len(plan.tasks), len(plan.shards), plan.bytes_read, plan.bytes_written,
                           time.perf_counter() - started, plan.counts(), plan.warnings, plan.notes, {})
    try:
        check_disk_space(plan)
        recipe = resolved_plan_recipe(plan)  # the digests: before any write
        done = Progress(on_progress)
        with atomic_directory(plan.output, force=plan.force, notes=plan.notes, sync=plan.sync,
                              adopt=plan.resume_from) as directory:
            for stage in plan.stage_plans:
                stage.output.mkdir(parents=True)
                write_merge(stage, stage.output, done, resolved_recipe(stage.recipe, stage.inputs, stage.output,
                                                                       normalize=stage.method.normalize(stage.recipe),
                                                                       stage=True))
            write_merge(plan, directory, done, recipe)
            if plan.stage_plans:
                shutil.rmtree(plan.stage_plans[0].output.parent)
    finally:
        for each in plans:
            for stage in each.stages:
                if stage.cleanup:
                    stage.cleanup()
            each.inputs.close()
    return MergeReport(plan.output, len(plan.tasks), len(plan.shards), sum(each.bytes_read for each in plans),
                       plan.bytes_written, time.perf_counter() - started, plan.counts(),
                       [warning for each in plans for warning in each.warnings], plan.notes, fetched_per_input(plan))


def resolved_plan_recipe(plan: MergePlan) -> Recipe:
    """The recipe as run, for mergecli.toml: the merge's, and each of its stages' (paths relative to the
    output)."""
    recipe = resolved_recipe(plan.recipe, plan.inputs, plan.output, normalize=plan.method.normalize(plan.recipe))
    if not plan.stage_plans:
        return recipe
    stages = [resolved_recipe(stage.recipe, stage.inputs, plan.output, normalize=stage.method.normalize(stage.recipe),
                              stage=True) for stage in plan.stage_plans]
    return with_stages(recipe, stages)


def write_merge(plan: MergePlan, directory: Path, done: Progress, recipe: Recipe) -> None:
    """Stream one planned merge into `directory` (its shards, or with `output_format = "lora"` an adapter of
    its base, then its support files)."""
    specs = {t.out.name: t.out for t in plan.tasks}
    adapter = None
    digest = hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()  # what a resume record belongs to
    kept: set[str] = set()
    if plan.resume_from is not None:
        kept, notes = finished_shards(directory, digest, [shard.filename for shard in plan.shards])
        plan.notes.extend(notes)
    if plan.recipe.output_format == "lora":
        rank = plan.recipe.lora_rank or (None if plan.recipe.lora_error else DEFAULT_LORA_RANK)  # error: capped
        adapter = AdapterWriter(plan.inputs.base, rank=rank, error=plan.recipe.lora_error,
                                base_name=base_name(plan.recipe.base.path))
        writer = LoraSink(adapter, specs)
    else:
        record = (lambda filename: record_shard(directory, filename, digest)) if len(plan.shards) > 1 else None
        writer = ShardWriter(directory, plan.shards, specs, sync=plan.sync, fp8=plan.fp8, done=kept,
                             on_shard_done=record)
    where = {name: shard.filename for shard in plan.shards for name in shard.offsets}
    try:
        non_finite = NonFinite(plan.recipe.allow_non_finite, plan.warnings)
        for stage in plan.stages:
            done.start(stage)
            if stage.before:
                stage.before()
                done.advance(stage.hook_cost / 2)
            stream_tasks([task for task in stage.tasks if where.get(task.out.name) not in kept], writer, done.update,
                         non_finite=non_finite)
            done.stage_done()
            if stage.after:
                stage.after(writer.checkpoint())
                done.advance(stage.hook_cost / 2)
        if plan.inputs.fetcher is not None:  # every streamed file against the Hub's sha256, before it counts
            plan.inputs.fetcher.verify()
        if adapter is not None:
            adapter.write(directory)
        else:
            writer.finish()
            forget(directory)  # the resume record: not part of the output
    finally:
        writer.close()
    write_support(plan, directory, recipe, adapter)


def write_support(plan: MergePlan, directory: Path, recipe: Recipe, adapter: AdapterWriter | None = None) -> None:
    """The support files and the card of a merge whose tensors are written."""
    sizes = {name: ckpt.nbytes for name, ckpt in zip(plan.recipe.input_names, plan.inputs.all)}
    quantization = plan.fp8.config([t.out for t in plan.tasks]) if plan.fp8 and plan.fp8.names else None
    write_support_files(directory, support=plan.support, method=plan.method, dtype=config_dtype(plan),
                        quantization=quantization, adapter=adapter,
                        recipe=recipe, sizes=sizes, directory_name=plan.output.name, notes=plan.task_notes())


def fetched_per_input(plan: MergePlan) -> dict[str, int]:
    """Bytes fetched from the Hub by range requests (`--stream`), per streamed input, by its name."""
    return {name: sum(file.fetched for file in checkpoint.remote_files)
            for name, checkpoint in zip(plan.recipe.input_names, plan.inputs.all) if checkpoint.remote_files}
