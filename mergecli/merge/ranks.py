"""A merge under `torchrun`: the ranks split the output's shards, and the output is the one process's, byte for
byte.

- Every rank plans the same merge from the headers (the plan is deterministic) and checks, by digest, that the
  others planned the same recipe; rank 0 makes the output's temporary directory and every shard file (its
  header, preallocated), and the others find it there (a file system that is not shared is said at once).
- Rank r merges the tensors of shards r, r + W, r + 2W, ... (a tensor whose fp8 scales fall into the next shard
  writes them there: the files already exist). The shards' bytes are what one process writes: the same tasks,
  the same arithmetic, at the same offsets.
- Each rank then says whether it succeeded (all_reduce); if any failed, every rank fails and rank 0 removes the
  directory: nothing is published. Otherwise rank 0 writes the index, the support files and the card, and puts
  the output in place atomically, as one process does.
Methods whose merge runs in stages that read the output back (RegMean), recipes with stages and adapter
outputs are refused in one line.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import MergecliError, UsageError
from mergecli.io.atomic import atomic_directory
from mergecli.io.writer import ShardWriter
from mergecli.merge.plan import MergePlan
from mergecli.merge.stream import NonFinite, stream_tasks
from mergecli.recipe.dump import dump_recipe


def check_splittable(plan: MergePlan) -> None:
    if plan.stage_plans or any(stage.before or stage.after for stage in plan.stages):
        raise UsageError(f"{plan.recipe.method}: a merge in stages (a recipe's stages, RegMean's solves) does not "
                         "run under torchrun yet", hint="run it as one process")
    if plan.resume_from is not None:
        raise UsageError("--resume does not run under torchrun yet", hint="resume it as one process")
    if plan.recipe.output_format != "safetensors":
        raise UsageError("output_format = \"lora\" does not run under torchrun yet", hint="run it as one process")


def _agree(value: Any, what: str) -> None:
    """Every rank holds the same `value` (a digest), else every rank fails saying so."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        raise UsageError(f"the torchrun ranks disagree on {what} ({len(set(values))} different ones)",
                         hint="give every rank the same recipe, inputs and options")


def _all_succeeded(ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def write_on_ranks(plan: MergePlan, recipe: Any, write_support: Any, on_progress: Any = None) -> None:
    """This rank's share of the merge; rank 0 publishes the whole output once every rank has succeeded.

    Args:
        recipe: the resolved recipe (mergecli.toml), compared across ranks by digest.
        write_support: writes the support files and card into a directory (rank 0, after the shards).
    """
    import torch.distributed as dist

    check_splittable(plan)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        _agree(hashlib.sha256(dump_recipe(recipe).encode()).hexdigest(), "the recipe")
        if rank == 0:
            with atomic_directory(plan.output, force=plan.force, notes=plan.notes, sync=plan.sync) as directory:
                _rank_part(plan, directory, rank, world, on_progress)
                write_support(directory)
        else:
            _rank_part(plan, None, rank, world, on_progress)
    finally:
        if created:
            dist.destroy_process_group()
        plan.inputs.close()


def _rank_part(plan: MergePlan, directory: Path | None, rank: int, world: int, on_progress: Any) -> None:
    import torch.distributed as dist

    shared = [str(directory) if directory is not None else None]
    dist.broadcast_object_list(shared, src=0)
    specs = {task.out.name: task.out for task in plan.tasks}
    writer = None
    if rank == 0:  # every shard file, its header written, before any rank writes into it
        writer = ShardWriter(Path(shared[0]), plan.shards, specs, sync=plan.sync, fp8=plan.fp8)
    dist.barrier()
    ok = True
    try:
        if not Path(shared[0]).is_dir():
            raise MergecliError(f"rank {rank} cannot see {shared[0]}, the output rank 0 is writing: the ranks "
                                "do not share a file system there",
                                hint="give -o a directory on a file system every machine mounts")
        if writer is None:
            writer = ShardWriter(Path(shared[0]), plan.shards, specs, sync=plan.sync, fp8=plan.fp8, create=False)
        mine = {shard.filename for number, shard in enumerate(plan.shards) if number % world == rank}
        where = {name: shard.filename for shard in plan.shards for name in shard.offsets}
        tasks = [task for task in plan.tasks if where[task.out.name] in mine]
        stream_tasks(tasks, writer, on_progress, non_finite=NonFinite(plan.recipe.allow_non_finite, plan.warnings))
        writer.close()
        writer.check_written({task.out.name for task in tasks})
    except BaseException:
        ok = False
        if writer is not None:
            writer.close()
        _all_succeeded(False)
        raise
    if not _all_succeeded(ok):
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise MergecliError("another torchrun rank failed: nothing was written", hint="its own error says why")
    if rank == 0:
        writer.write_index()
