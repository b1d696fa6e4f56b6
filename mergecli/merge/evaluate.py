"""`mergecli eval`: the next-token loss of each input model and of the recipe's merge on held-out data,
the merge never written.

Each model runs one transformer block at a time (stats/engine.py, as RegMean++ runs): its block's weights
are loaded when the data reaches it and freed after, its hidden states kept within a memory budget and
spilled beyond it. The merge is a checkpoint whose tensors are merged when read (`MergedCheckpoint`): its
method's prepasses (TIES' thresholds, a norm) run once over the inputs first, then each model block's tensors
are combined together, by the merge's own streaming loop, when the skeleton loads that block.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import UsageError
from mergecli.io.blocks import block_of
from mergecli.io.safetensors import TensorInfo
from mergecli.merge.plan import MergePlan, plan_unwritten
from mergecli.merge.stream import WholeTensors, stream_tasks
from mergecli.recipe import Recipe
from mergecli.stats.calibration import model_batches, read_examples
from mergecli.stats.engine import advance, run_block, run_head, run_prefix
from mergecli.stats.hidden import MemoryBudget
from mergecli.stats.skeleton import build_skeleton, forward_of, max_positions


class MergedCheckpoint:
    """The recipe's merge seen as a checkpoint: a tensor is merged when it is read, with the other tensors
    of its model block (which the skeleton loads together); nothing is written."""

    def __init__(self, plan: MergePlan, *, prepasses: bool = True):
        if any(stage.before or stage.after for stage in plan.stages) or len(plan.stages) != 1:
            raise UsageError(f"{plan.recipe.method}: a method whose merge runs in stages (RegMean) is not "
                             "evaluated yet", hint="evaluate its output: `mergecli merge`, then `mergecli eval` "
                                                   "of a recipe with that output as its one model")
        self.plan, self.source = plan, "the merge"
        self.tasks = {task.out.name: task for task in plan.tasks}
        self.tensors = {name: TensorInfo(name, task.out.dtype, task.out.shape) for name, task in self.tasks.items()}
        reference = plan.inputs.reference
        self.directory, self.fetcher, self.commit = reference.directory, None, None
        self._config = reference.config()
        self.held: dict[str, torch.Tensor] = {}
        if prepasses:  # once, before any block (`mergecli sweep` runs them itself, its candidates side by side)
            stream_tasks(plan.tasks, WholeTensors({}), combine=False)

    def config(self, **_: Any) -> dict | None:
        return self._config

    def read(self, name: str, rows: tuple[int, int] | None = None, **_: Any) -> torch.Tensor:
        if name not in self.held:
            where = block_of(name)
            group = [task for other, task in self.tasks.items() if other not in self.held
                     and (other == name or (where is not None and block_of(other) == where))]
            writer = WholeTensors({task.out.name: task.out for task in group})
            with torch.inference_mode(False):  # the skeleton loads inside inference mode, the workers do not
                stream_tasks(group, writer, prepasses=False)
            self.held.update(writer.tensors)
        tensor = self.held.pop(name)  # read once per load: the skeleton keeps it while the block runs
        return tensor[rows[0]:rows[1]] if rows else tensor

    def remote_reads(self, name: str, rows: Any) -> list:
        return []

    def close(self) -> None:
        self.held.clear()


def next_token_loss(batch: Any, output: Any) -> tuple[float, int]:
    """(summed cross-entropy, tokens) of each real token predicted from the ones before it."""
    logits = (output.logits if hasattr(output, "logits") else output[0]).float()
    ids = batch.inputs["input_ids"]
    mask = batch.mask if batch.mask is not None else torch.ones_like(ids, dtype=torch.bool)
    valid = (mask[:, 1:] & mask[:, :-1]).bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               ids[:, 1:].reshape(-1), reduction="none").view(valid.shape)
    return float(losses[valid].double().sum()), int(valid.sum())


def score(checkpoints: list[Any], labels: list[str], data: Any, *, batch_size: int, max_length: int, device: str,
          budget: MemoryBudget, dtype: torch.dtype | None = None,
          on_block: Any = None) -> list[dict[str, Any]]:
    """Each model's mean next-token loss (and perplexity) on `data`, run one block at a time, the models side
    by side: block k of every model runs before block k + 1 of any (`mergecli sweep`'s candidates read each
    input block once). `on_block(k, count)` is told as each block is done."""
    runs = []
    try:
        for checkpoint, label in zip(checkpoints, labels):
            skeleton = build_skeleton(checkpoint.directory, checkpoint, device=device, label=label, dtype=dtype)
            batches, _ = model_batches(data, checkpoint.directory, batch_size=batch_size, max_length=max_length,
                                       max_positions=max_positions(skeleton.model), label=label)
            batches = [batch.to(device, skeleton.dtype) for batch in batches]
            forward = forward_of(skeleton.model, data.kind)
            runs.append((skeleton, forward, run_prefix(skeleton, batches, forward, budget, safe(label))))
        count = len(runs[0][0].blocks) if runs else 0
        for index in range(count):
            for skeleton, _, acts in runs:
                advance(acts, run_block(skeleton, index, acts, name=safe(skeleton.label)))
            if on_block is not None:
                on_block(index + 1, count)
        rows = []
        for (skeleton, forward, acts), label in zip(runs, labels):
            total, tokens = 0.0, 0
            for batch, output in run_head(skeleton, acts, forward):
                loss, counted = next_token_loss(batch, output)
                total, tokens = total + loss, tokens + counted
            mean = total / tokens if tokens else float("nan")
            rows.append({"name": label, "loss": mean, "perplexity": math.exp(mean) if tokens else float("nan"),
                         "tokens": tokens})
        return rows
    finally:
        for _, _, acts in runs:
            acts.close()


def safe(label: str) -> str:
    return label.replace("/", "-").replace(" ", "-")


def evaluate(recipe: Recipe, data_path: str, *, num_examples: int = 64, batch_size: int = 8,
             max_length: int = 512, device: str = "cpu", memory_budget: int = 2 * 10**9,
             text_field: str = "text", on_progress: Any = None) -> dict[str, Any]:
    """`mergecli eval`: each input model's loss and the merge's, in float32, in one JSON-ready object.
    `on_progress(done, count, what)` is told as each block of the inputs, then of the merge, is done."""
    data = read_examples(data_path, num_examples=num_examples, text_field=text_field, label="--data")
    if data.kind == "image":
        raise UsageError("--data: images have no next token to predict", hint="give text (.jsonl or .txt)")
    plan = plan_unwritten(recipe, device=device)
    spill = Path(tempfile.mkdtemp(prefix="mergecli-eval-"))
    budget = MemoryBudget(memory_budget, spill)
    options = {"batch_size": batch_size, "max_length": max_length, "device": device, "budget": budget,
               "dtype": torch.float32}
    try:
        def told(what: str) -> Any:
            return None if on_progress is None else lambda done, count: on_progress(done, count, what)

        models = score(plan.inputs.all, list(recipe.input_names), data, on_block=told("the inputs"), **options)
        merged = score([MergedCheckpoint(plan)], ["merge"], data, on_block=told("the merge"), **options)[0]
    finally:
        plan.inputs.close()
        shutil.rmtree(spill, ignore_errors=True)
    return {"models": models, "merge": merged, "data": {"examples": len(data.examples), "tokens": merged["tokens"]}}
