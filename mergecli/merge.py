"""The streaming merge: checkpoints → method → writer, one block of one tensor at a time.

`plan_average` opens the inputs' headers, checks them against each other and decides, for every
output tensor, where it comes from; nothing is read yet. `run_merge` then streams: a reader
thread reads the next blocks while the main thread combines and writes the current one.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergecli.buffers import BufferRing, ScratchBuffers
from mergecli.checkpoint import Checkpoint, TensorInfo, iter_row_blocks, open_checkpoint
from mergecli.errors import MergecliError, ShapeMismatchError, UsageError
from mergecli.methods.average import accumulation_dtype, weighted_sum
from mergecli.recipe import Recipe, dump_recipe
from mergecli.writer import OutputTensor, ShardPlan, ShardWriter, atomic_directory, check_output_path, plan_shards

HEAD_PATTERNS = [r"lm_head\..*", r"score\..*", r"classifier\..*"]
BLOCK_ELEMENTS = 4 * 2**20  # elements per row block: bounds memory for any tensor size
PREFETCH_DEPTH = 2  # block sets read ahead of the one being combined
WRITE_DEPTH = 2  # merged blocks handed to the writer thread and not yet written
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.txt", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "generation_config.json",
)
OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ProgressCallback = Callable[[int, int], None]  # (tensors done, bytes read so far)
Combine = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: read `name` from `sources`, `combine` the blocks."""

    out: OutputTensor
    kind: str  # "average" | "head" | "exclude" | "integer" | a method's own kind
    sources: tuple[Checkpoint, ...]
    combine: Combine
    block_elements: int = BLOCK_ELEMENTS
    work_bytes: int = 0  # memory `combine` itself allocates beyond the blocks (e.g. statistics it loads)

    @property
    def bytes_read(self) -> int:
        return sum(source.tensors[self.out.name].nbytes for source in self.sources)


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


@dataclass
class MergePlan:
    """Everything decided before the first tensor is read."""

    recipe: Recipe
    output: Path
    force: bool
    inputs: Inputs
    tasks: list[TensorTask]
    shards: list[ShardPlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(task.bytes_read for task in self.tasks)

    @property
    def bytes_written(self) -> int:
        return sum(shard.size for shard in self.shards)

    @property
    def peak_memory(self) -> int:
        """Estimated peak bytes above the interpreter: read-ahead block sets plus the accumulator."""
        peak = 0
        for task in self.tasks:
            info = task.sources[0].tensors[task.out.name]
            elements = max(rows_elements(info, task.block_elements))
            read = sum(s.tensors[task.out.name].dtype.itemsize for s in task.sources) * elements
            peak = max(peak, (PREFETCH_DEPTH + 2) * read + elements * (8 + (WRITE_DEPTH + 1) * task.out.dtype.itemsize)
                       + task.work_bytes)
        return peak

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.kind] = counts.get(task.kind, 0) + 1
        return counts


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


def rows_elements(info: TensorInfo, block_elements: int) -> Iterator[int]:
    per_row = info.numel // info.shape[0] if info.shape and info.shape[0] else info.numel
    for rows in iter_row_blocks(info, block_elements):
        yield info.numel if rows is None else (rows[1] - rows[0]) * per_row


# ---------------------------------------------------------------------------------------------
# Planning


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


def _label(recipe: Recipe, inputs: Inputs, checkpoint: Checkpoint) -> str:
    if checkpoint is inputs.base:
        return "base"
    return recipe.models[inputs.models.index(checkpoint)].name


def check_compatible(recipe: Recipe, inputs: Inputs) -> None:
    """Every input must hold the same tensor names and shapes; list every mismatch."""
    problems = []
    everyone = inputs.all
    names = list(dict.fromkeys(n for c in everyone for n in c.tensors))
    for name in names:
        missing = [_label(recipe, inputs, c) for c in everyone if name not in c.tensors]
        if missing:
            problems.append(f"{name}: missing in {', '.join(missing)}")
            continue
        infos = [c.tensors[name] for c in everyone]
        if len({i.shape for i in infos}) > 1:
            shapes = ", ".join(f"{_label(recipe, inputs, c)} {list(c.tensors[name].shape)}" for c in everyone)
            problems.append(f"{name}: shapes differ: {shapes}")
        elif len({i.dtype.is_floating_point for i in infos}) > 1:
            dtypes = ", ".join(f"{_label(recipe, inputs, c)} {c.tensors[name].dtype}" for c in everyone)
            problems.append(f"{name}: floating and integer dtypes mixed: {dtypes}")
    if problems:
        raise ShapeMismatchError(problems)


def output_dtype(recipe: Recipe, info: TensorInfo) -> torch.dtype:
    """Floating tensors get the recipe's dtype ("auto": the reference's); others keep theirs."""
    if not info.dtype.is_floating_point or recipe.dtype == "auto":
        return info.dtype
    return OUTPUT_DTYPES[recipe.dtype]


def _copy_first(blocks: list[torch.Tensor]) -> torch.Tensor:
    return blocks[0]


def _integer_combine(name: str, warnings: list[str]) -> Combine:
    def combine(blocks: list[torch.Tensor]) -> torch.Tensor:
        if any(not torch.equal(blocks[0], b) for b in blocks[1:]):
            message = f"{name}: integer tensor differs between models; copied from the reference model"
            if message not in warnings:
                warnings.append(message)
        return blocks[0]

    return combine


def default_tasks(recipe: Recipe, inputs: Inputs, warnings: list[str]) -> list[TensorTask]:
    """One task per tensor of the reference: averaged, or copied from the reference model."""
    head = [re.compile(p) for p in (recipe.head if recipe.head is not None else HEAD_PATTERNS)]
    exclude = [re.compile(p) for p in recipe.exclude]
    weights = recipe.weights
    reference = inputs.reference

    accumulators = ScratchBuffers()  # combine runs on one thread: one accumulator, reused

    def average(blocks: list[torch.Tensor]) -> torch.Tensor:
        dtype = accumulation_dtype([b.dtype for b in blocks])
        return weighted_sum(blocks, weights, out=accumulators.tensor(dtype, blocks[0].shape, dtype))

    block = BLOCK_ELEMENTS
    tasks = []
    for name, info in reference.tensors.items():
        out = OutputTensor(name, output_dtype(recipe, info), info.shape)
        if any(p.fullmatch(name) for p in exclude):
            tasks.append(TensorTask(out, "exclude", (reference,), _copy_first, block))
        elif recipe.backbone_only and any(p.fullmatch(name) for p in head):
            tasks.append(TensorTask(out, "head", (reference,), _copy_first, block))
        elif not info.dtype.is_floating_point:
            tasks.append(TensorTask(out, "integer", (reference, *inputs.models),
                                    _integer_combine(name, warnings), block))
        else:
            tasks.append(TensorTask(out, "average", tuple(inputs.models), average, block))
    for pattern in exclude:
        if not any(pattern.fullmatch(n) for n in reference.tensors):
            warnings.append(f"exclude pattern {pattern.pattern!r} matches no tensor")
    if recipe.backbone_only and not any(t.kind == "head" for t in tasks):
        warnings.append("backbone_only: no tensor matches the head patterns "
                        "(tied embeddings store no lm_head); everything was averaged")
    return tasks


def input_paths(inputs: Inputs) -> list[Path]:
    return [c.directory or c.files[0] for c in inputs.all]


def make_plan(recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], *, output: Path, force: bool,
              warnings: list[str]) -> MergePlan:
    check_output_path(output, input_paths(inputs), force=force)
    shards = plan_shards([task.out for task in tasks], recipe.shard_size)
    return MergePlan(recipe, output.resolve(), force, inputs, tasks, shards, warnings)


def resolve_output(recipe: Recipe, output: Path | str | None) -> Path:
    target = output if output is not None else recipe.output
    if target is None:
        raise UsageError("no output directory", hint="set `output` in the recipe or pass -o DIR")
    return Path(target).expanduser().resolve()


def plan_average(recipe: Recipe, *, output: Path | str | None = None, force: bool = False) -> MergePlan:
    """Open and check the inputs of an `average` recipe and plan the output; read no tensor.

    Raises:
        UsageError: no output, output exists (without `force`) or overlaps an input.
        InputNotFoundError, CheckpointError, ShapeMismatchError: bad inputs.
    """
    target = resolve_output(recipe, output)
    inputs = open_inputs(recipe)
    try:
        check_compatible(recipe, inputs)
        warnings: list[str] = []
        tasks = default_tasks(recipe, inputs, warnings)
        return make_plan(recipe, inputs, tasks, output=target, force=force, warnings=warnings)
    except BaseException:
        inputs.close()
        raise


# ---------------------------------------------------------------------------------------------
# Running


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterator, depth: int) -> Iterator:
    """Iterate `items` in a background thread, at most `depth` items ahead of the consumer."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="mergecli-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _read_blocks(tasks: list[TensorTask]) -> Iterator[tuple[TensorTask, int, list[torch.Tensor], bool]]:
    ring = BufferRing(PREFETCH_DEPTH + 2)
    for task in tasks:
        name = task.out.name
        blocks = list(iter_row_blocks(task.sources[0].tensors[name], task.block_elements))
        for i, rows in enumerate(blocks):
            buffers = ring.next()
            tensors = [source.read(name, rows, buffer=buffers.get(k, _block_bytes(source.tensors[name], rows)))
                       for k, source in enumerate(task.sources)]
            yield task, rows[0] if rows else 0, tensors, i == len(blocks) - 1


def _block_bytes(info: TensorInfo, rows: tuple[int, int] | None) -> int:
    return info.nbytes if rows is None else (rows[1] - rows[0]) * info.row_bytes


@contextmanager
def compute_threads() -> Iterator[None]:
    """Leave two cores to the reader and writer threads: torch's spinning intra-op threads would
    otherwise take their CPU time (on 2 cores, one compute thread merges ~30% faster than two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 1) - 2)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _stream_blocks(plan: MergePlan, writer: ShardWriter, on_progress: ProgressCallback | None) -> None:
    """Read (reader thread) → combine (this thread) → write (writer thread), all overlapped.

    A merged block is copied into a buffer of the output ring (this is also its cast to the output
    dtype) and handed to the writer thread; with at most WRITE_DEPTH writes in flight, a ring of
    WRITE_DEPTH + 1 buffers is never refilled while its previous block is still being written.
    """
    outputs = BufferRing(WRITE_DEPTH + 1)
    tensors_done = bytes_done = 0
    # closing(): the reader thread is stopped and joined here, even on Ctrl-C, not whenever the
    # generator happens to be collected (a reader still inside torch at interpreter exit aborts it).
    with compute_threads(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-writer") as pool, \
            closing(prefetched(_read_blocks(plan.tasks), PREFETCH_DEPTH)) as blocks_read:
        in_flight: deque[Future] = deque()
        try:
            for task, row_start, blocks, last in blocks_read:
                merged = task.combine(blocks)
                if len(in_flight) == WRITE_DEPTH:
                    in_flight.popleft().result()
                out = outputs.next().tensor("out", tuple(merged.shape), task.out.dtype).copy_(merged)
                in_flight.append(pool.submit(writer.write, task.out.name, out, row_start))
                bytes_done += sum(b.nbytes for b in blocks)
                tensors_done += last
                del merged, blocks
                if on_progress:
                    on_progress(tensors_done, bytes_done)
            while in_flight:
                in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()


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


def run_merge(plan: MergePlan, *, on_progress: ProgressCallback | None = None) -> MergeReport:
    """Stream the planned merge into the output directory, atomically.

    Returns:
        A `MergeReport` (output path, sizes, time, what was done to how many tensors, warnings).

    Raises:
        MergecliError: not enough disk space, or a read / write failure (nothing is left behind).
    """
    started = time.perf_counter()
    try:
        check_disk_space(plan)
        with atomic_directory(plan.output, force=plan.force) as directory:
            writer = ShardWriter(directory, plan.shards, {t.out.name: t.out for t in plan.tasks})
            try:
                _stream_blocks(plan, writer, on_progress)
                writer.finish()
            finally:
                writer.close()
            write_support_files(plan, directory)
    finally:
        plan.inputs.close()
    return MergeReport(plan.output, len(plan.tasks), len(plan.shards), plan.bytes_read,
                       plan.bytes_written, time.perf_counter() - started, plan.counts(), plan.warnings)


# ---------------------------------------------------------------------------------------------
# Config, tokenizer, card, resolved recipe


def _config_dtype(plan: MergePlan) -> str:
    dtypes = [t.out.dtype for t in plan.tasks if t.out.dtype.is_floating_point]
    common = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    return str(common).removeprefix("torch.")


def _first_with(inputs: Inputs, filename: str) -> Path | None:
    for checkpoint in [inputs.reference, *inputs.models]:
        if checkpoint.directory and (checkpoint.directory / filename).is_file():
            return checkpoint.directory
    return None


def resolved_recipe(plan: MergePlan) -> Recipe:
    """The recipe as run: absolute output, hub revisions pinned to the resolved commits."""
    recipe = plan.recipe
    models = [
        spec.model_copy(update={"revision": ckpt.commit}) if ckpt.commit else spec
        for spec, ckpt in zip(recipe.models, plan.inputs.models)
    ]
    update: dict = {"models": models, "output": str(plan.output)}
    if recipe.base and plan.inputs.base and plan.inputs.base.commit:
        update["base"] = recipe.base.model_copy(update={"revision": plan.inputs.base.commit})
    return recipe.model_copy(update=update)


def write_support_files(plan: MergePlan, directory: Path) -> None:
    """config.json (with the output dtype), tokenizer files, the model card, mergecli.toml."""
    from mergecli.card import render_card

    source = _first_with(plan.inputs, "config.json")
    config = None
    if source:
        config = json.loads((source / "config.json").read_text())
        dtype = _config_dtype(plan)
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if plan.recipe.copy_tokenizer:
        tokenizer_dir = _first_with(plan.inputs, "tokenizer_config.json") or _first_with(
            plan.inputs, "preprocessor_config.json")
        if tokenizer_dir is None:
            if source:  # a transformers checkpoint without a tokenizer is worth a word
                plan.warnings.append("copy_tokenizer: no input has tokenizer files; none copied")
        else:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, directory / name)
    recipe = resolved_recipe(plan)
    (directory / "mergecli.toml").write_text(dump_recipe(recipe))
    (directory / "README.md").write_text(render_card(recipe, config=config))
