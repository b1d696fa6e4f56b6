"""Stages: earlier merges of a recipe (`[[stages]]`, mergekit-multi's named documents) that its models,
or later stages, name as `stage:NAME`.

Each stage is planned before the merge, in order, against the stages before it, whose outputs do not
exist yet: a `PlannedCheckpoint` stands for one (its tensors, config and support files, as planned, in
the place it will be written). At run time each stage is written, in order, into scratch inside the
output's temporary directory (`.stages/NAME`), read by what follows, and removed before the output is
put in place: only the final output is kept. An intermediate is written rather than computed as it is
read because a method may read its inputs several times (TIES' thresholds, SLERP's angles, RegMean's
statistics): each read of an intermediate merged on the fly would merge it again, and the merges it
reads in turn; written once, it costs its size in scratch space and one write.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecli.io.checkpoint import Checkpoint
from mergecli.io.safetensors import TensorInfo

SCRATCH = ".stages"  # under the output's temporary directory


@dataclass
class PlannedCheckpoint(Checkpoint):
    """An earlier stage's output before it is written: its tensors where its shards will hold them, its
    config and support files as its plan has them."""

    planned_config: dict[str, Any] | None = None
    planned_files: dict[str, Path] = field(default_factory=dict)

    def config(self, *, strict: bool = False) -> dict | None:
        return self.planned_config


def planned_checkpoint(name: str, plan: Any) -> PlannedCheckpoint:
    """What stage `name` will write, as its plan (a `MergePlan`) lays it out."""
    tensors = {}
    for shard in plan.shards:
        for tensor, offset in shard.offsets.items():
            spec = next(task.out for task in plan.tasks if task.out.name == tensor)
            tensors[tensor] = TensorInfo(tensor, spec.dtype, spec.shape, plan.output / shard.filename, offset)
    files = [plan.output / shard.filename for shard in plan.shards]
    return PlannedCheckpoint(f"stage:{name}", files, tensors, plan.output, planned_config=plan.support.config,
                             planned_files=dict(plan.support.copies))


def stage_directory(temporary: Path, name: str) -> Path:
    """Where stage `name` is written, inside the output's temporary directory."""
    return temporary / SCRATCH / name
