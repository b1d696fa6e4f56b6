"""`mergecli sweep`: every combination of a grid of recipe settings scored on held-out data, side by side,
each input block read once for all candidates.

Each candidate is the recipe with its `--set`s. They are planned apart (each its own tasks), but their
reads of the inputs go through one `SharedReads`: the first candidate to read a block of rows reads it, the
others get a copy, and it is let go once each has. To keep that to a block at a time, the candidates run
side by side: each tensor's prepasses (TIES' thresholds), every depth, candidate after candidate (its reads
held until the tensor is done), then every model block of every candidate before the next block
(evaluate.score; a read let go once every candidate has made it). The inputs are read once by the prepasses and
once by the merges, however many candidates there are.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from mergecli.errors import UsageError
from mergecli.merge.evaluate import MergedCheckpoint, score
from mergecli.merge.plan import plan_unwritten
from mergecli.merge.stream import WholeTensors, run_prepass
from mergecli.recipe import Recipe
from mergecli.stats.calibration import read_examples
from mergecli.stats.hidden import MemoryBudget


class SharedReads:
    """Reads of the same rows of the same input by several candidates: read once, copied to each, and let go
    when each has read them (or when the step that reads them is over: `forget`)."""

    def __init__(self, readers: int):
        self.readers = readers
        self.lock = threading.Lock()
        self.held: dict[tuple, list] = {}
        self.bytes_read = 0
        self.until_forget = False  # True: keep every read until `forget` (a tensor's prepasses, all depths)

    def install(self, checkpoint: Any, key: str, candidate: int) -> None:
        """Route `checkpoint`'s reads (candidate `candidate`'s copy of input `key`) through the shared ones."""
        original = checkpoint.read

        def read(name: str, rows: tuple[int, int] | None = None, **_: Any) -> Any:
            slot = (key, name, rows)
            with self.lock:
                entry = self.held.setdefault(slot, [None, set(), threading.Lock()])
            with entry[2]:
                if entry[0] is None:
                    entry[0] = original(name, rows)
                    self.bytes_read += entry[0].nbytes
                value = entry[0].clone()  # a combine may work in place on its blocks
            with self.lock:
                entry[1].add(candidate)  # a candidate may read it again (a probe run): kept until each has
                if len(entry[1]) >= self.readers and not self.until_forget:
                    self.held.pop(slot, None)
            return value

        checkpoint.read = read

    def forget(self) -> None:
        with self.lock:
            self.held.clear()


def grid_overrides(grid: list[str]) -> list[dict[str, str]]:
    """`KEY=V1,V2` options as every combination of `--set KEY=V` values, in grid order."""
    axes = []
    for option in grid:
        key, sep, values = option.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise UsageError(f"--grid {option!r}: expected KEY=V1,V2,...", hint="e.g. --grid ties.density=0.2,0.5")
        axes.append([(key.strip(), value.strip()) for value in values.split(",") if value.strip()])
    return [dict(combo) for combo in itertools.product(*axes)]


def sweep(recipes: list[Recipe], settings: list[dict[str, str]], data_path: str, *, num_examples: int = 64,
          batch_size: int = 8, max_length: int = 512, device: str = "cpu", memory_budget: int = 2 * 10**9,
          on_progress: Any = None) -> dict[str, Any]:
    """Every candidate's loss on the data, ranked (best first), and the bytes of the inputs read in all.
    `on_progress(done, count, what)` is told as each block of every candidate is done."""
    data = read_examples(data_path, num_examples=num_examples, label="--data")
    if data.kind == "image":
        raise UsageError("--data: images have no next token to predict", hint="give text (.jsonl or .txt)")
    plans = [plan_unwritten(recipe, device=device) for recipe in recipes]
    reads = SharedReads(len(plans))
    spill = Path(tempfile.mkdtemp(prefix="mergecli-sweep-"))
    try:
        for number, plan in enumerate(plans):
            for checkpoint, path in zip(plan.inputs.all, [spec.path for spec in plan.recipe.input_specs]):
                reads.install(checkpoint, path, number)
        by_name = [{task.out.name: task for task in plan.tasks} for plan in plans]
        depth = max((len(task.prepasses) for plan in plans for task in plan.tasks), default=0)
        reads.until_forget = True
        for name in by_name[0]:  # each tensor's prepasses, every depth, candidate after candidate: one read
            for level in range(depth):
                for tasks in by_name:
                    if name in tasks:
                        run_prepass([tasks[name]], level, WholeTensors({}))
            reads.forget()
        reads.until_forget = False
        merged = [MergedCheckpoint(plan, prepasses=False) for plan in plans]
        labels = [", ".join(f"{k}={v}" for k, v in each.items()) or "the recipe" for each in settings]

        def block_done(done: int, count: int) -> None:
            reads.forget()
            if on_progress is not None:
                on_progress(done, count, f"{len(plans)} candidates")

        rows = score(merged, labels, data, batch_size=batch_size, max_length=max_length, device=device,
                     budget=MemoryBudget(memory_budget, spill), on_block=block_done)
    finally:
        for plan in plans:
            plan.inputs.close()
        shutil.rmtree(spill, ignore_errors=True)
    candidates = [{"settings": {k: _value(v) for k, v in each.items()}, **{k: row[k] for k in
                                                                         ("loss", "perplexity", "tokens")}}
                  for each, row in zip(settings, rows)]
    order = sorted(range(len(candidates)), key=lambda i: candidates[i]["loss"])
    return {"candidates": [candidates[i] for i in order], "order": order, "bytes_read": reads.bytes_read}


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plot(candidates: list[dict[str, Any]], path: Path) -> Path:
    """Loss against each swept key (one panel per key), as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--report draws loss.png with matplotlib, which is not installed",
                         hint="pip install 'mergecli[plot]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(candidates[0]["settings"]) if candidates else []
    figure, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = sorted((c["settings"][key], c["loss"]) for c in candidates if isinstance(c["settings"][key],
                                                                                       (int, float)))
        axis.scatter([p[0] for p in points], [p[1] for p in points])
        axis.set_xlabel(key)
        axis.set_ylabel("held-out loss")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
