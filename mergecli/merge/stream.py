"""The streaming loop: worker threads each take the next row block of a tensor, read it from
every input, combine it and write it in place, so that a block's bytes go from the page cache to
the output while they are still in that core's cache; at most one block per worker is alive.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mergecli.errors import NonFiniteError, shown
from mergecli.io.buffers import ScratchBuffers
from mergecli.io.checkpoint import iter_row_blocks
from mergecli.io.precision import requantized
from mergecli.io.remote import Fetcher
from mergecli.io.safetensors import TensorInfo, TensorSpec
from mergecli.io.writer import ShardWriter
from mergecli.methods.average import CHUNK_ELEMENTS
from mergecli.methods.base import TensorTask

MAX_WORKERS = 4  # past a few threads, the copies in and out of the page cache share one memory bus
ProgressCallback = Callable[[int, float, str], None]  # (tensors done, work done so far: TensorTask.work, the pass)


def rows_elements(info: TensorInfo, block_elements: int) -> Iterator[int]:
    """The number of elements of each row block `iter_row_blocks` makes of `info`."""
    for rows in iter_row_blocks(info, block_elements):
        yield info.elements(rows)


def peak_memory(tasks: list[TensorTask]) -> int:
    """Estimated peak bytes of `stream_tasks` above the interpreter: per worker, one block of every
    input, the merged block and the accumulator chunk; and what a combine allocates."""
    peak = 0
    for task in tasks:
        info = task.sources[0].tensors[task.out.name]
        elements = max(rows_elements(info, task.block_elements))
        read = sum(s.tensors[task.out.name].dtype.itemsize for s in task.sources) * elements
        peak = max(peak, read + elements * task.out.dtype.itemsize + 8 * CHUNK_ELEMENTS + task.work_bytes)
    return peak * workers(tasks)


def workers(tasks: list[TensorTask]) -> int:
    """How many threads stream `tasks`: one per core (up to MAX_WORKERS) when every task's blocks
    can be combined in any order, else one, which combines each task's blocks in order."""
    if not all(task.independent_blocks for task in tasks):
        return 1
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def block_shape(task: TensorTask, first: torch.Tensor) -> tuple[int, ...]:
    """The shape of one merged row block: the first input block's rows, the output's other dims."""
    return tuple(task.out.shape) if not task.out.shape else (first.shape[0], *task.out.shape[1:])


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads for the stream: one per worker when several run (each worker is a
    core's worth of work already), all of them for a single worker (a RegMean solve uses them)."""
    previous = torch.get_num_threads()
    if count > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def finite(block: torch.Tensor) -> bool:
    """No NaN or inf in a floating block: its sum is finite (one cheap pass), or, when the sum is
    not (or overflows), every element is."""
    if not block.is_floating_point() or block.dtype.itemsize == 1:
        return True  # integers; float8 cannot be summed
    return math.isfinite(float(block.sum())) or bool(torch.isfinite(block).all())


@dataclass
class NonFinite:
    """What to do about NaN or inf in a merged block: fail (the default), or `allow` it and warn."""

    allow: bool = False
    warnings: list[str] = field(default_factory=list)

    def found(self, task: TensorTask, blocks: list[torch.Tensor]) -> None:
        bad = [source.source for source, block in zip(task.sources, blocks) if not finite(block)]
        name = task.out.name
        if bad:
            message = f"{shown(name)}: NaN or inf in the input {', '.join(bad)}"
        else:
            message = (f"{shown(name)}: the merged values are not finite (they overflow "
                       f"{str(task.out.dtype).removeprefix('torch.')})")
        if not self.allow:
            raise NonFiniteError(message, tensor=name)
        if message not in self.warnings:
            self.warnings.append(message + "; kept, as allow_non_finite asks")


def stream_tasks(tasks: list[TensorTask], writer: ShardWriter, on_progress: ProgressCallback | None = None, *,
                 non_finite: NonFinite | None = None, prepasses: bool = True, combine: bool = True) -> None:
    """Read → combine → write every row block of `tasks`, on `workers(tasks)` threads (this one and
    the others), each with buffers of its own; first, the tasks' prepasses (statistics of a whole
    tensor that their combines need: a magnitude threshold, a norm), each a streamed read of its own.

    Each worker takes the next block, `pread`s it from every input into its buffers, combines it
    into a buffer of the output dtype (a combine that returns another tensor has it copied there,
    which is also its cast) and `pwrite`s it at its final offset. Handing blocks from a reader to a
    combiner to a writer thread, as mergecli did before, moved each byte through memory twice more,
    between cores; a worker's block stays in its own cache. The first failure (or Ctrl-C) stops
    every worker after its current block and is raised here.
    (`prepasses` / `combine` False: that part is left out: `mergecli eval` runs the prepasses once, then
    combines a model block's tensors when its data reaches them.)
    """
    done = 0.0
    for depth in range(max((len(task.prepasses) for task in tasks), default=0) if prepasses else 0):
        todo = [task for task in tasks if len(task.prepasses) > depth and task.prepasses[depth].needed()]
        done = _run(_Stream(todo, writer, on_progress, non_finite or NonFinite(), depth=depth, work_done=done))
    if combine:
        _run(_Stream(tasks, writer, on_progress, non_finite or NonFinite(), work_done=done))


class WholeTensors:
    """A writer for the streaming loop that gathers each tensor's blocks in memory, whole: kept in `tensors`
    (`mergecli eval`'s merged blocks), or handed to `on_whole(name, tensor)` and let go once its last block is
    in (a merge written as an adapter)."""

    def __init__(self, specs: dict[str, TensorSpec], on_whole: Callable[[str, torch.Tensor], None] | None = None):
        self.specs, self.on_whole = specs, on_whole
        self.tensors: dict[str, torch.Tensor] = {}
        self._left: dict[str, int] = {}
        self.lock = threading.Lock()

    def row_align(self, name: str) -> int:
        return 1

    def write(self, name: str, block: torch.Tensor, row_start: int = 0) -> None:
        spec = self.specs[name]
        with self.lock:
            whole = self.tensors.get(name)
            if whole is None:
                whole = self.tensors[name] = torch.empty(spec.shape, dtype=spec.dtype)
                self._left[name] = spec.numel
        if spec.shape and block.dim():
            whole[row_start:row_start + block.shape[0]] = block
        else:
            whole.copy_(block)
        if self.on_whole is None:
            return
        with self.lock:
            self._left[name] -= block.numel()
            done = self._left[name] == 0
            if done:
                del self.tensors[name], self._left[name]
        if done:
            self.on_whole(name, whole)

    def close(self) -> None:
        if self.on_whole is not None:
            self.tensors.clear()


def run_prepass(tasks: list[TensorTask], depth: int, writer: Any) -> None:
    """The prepasses of one depth of `tasks` that have something to do (`mergecli sweep` runs each tensor's
    candidates in turn, so that they share each read)."""
    todo = [task for task in tasks if len(task.prepasses) > depth and task.prepasses[depth].needed()]
    if todo:
        _run(_Stream(todo, writer, None, NonFinite(), depth=depth))


def _run(stream: _Stream) -> float:
    """Run one streamed pass on its workers; returns the work done so far."""
    count = workers(stream.tasks)
    with torch_threads(count):
        others = [threading.Thread(target=stream.work, name=f"mergecli-worker-{i}", daemon=True)
                  for i in range(1, count)]
        for thread in others:
            thread.start()
        try:
            stream.work()
            for thread in others:  # they end when no block is left
                thread.join()
        finally:  # Ctrl-C during the join too: the others stop after their current block
            stream.stop.set()
            for thread in others:
                thread.join()
        if stream.error is not None:
            raise stream.error
    return stream.work_done


def announce_reads(blocks: list[tuple[TensorTask, tuple[int, int] | None]]) -> None:
    """Tell the fetcher of streamed hub inputs (`--stream`) what this pass reads, in its order."""
    fetchers: dict[int, tuple[Fetcher, list]] = {}
    for task, rows in blocks:
        for source in task.sources:
            if getattr(source, "fetcher", None) is not None:
                reads = source.remote_reads(task.out.name, rows)
                if reads:
                    fetchers.setdefault(id(source.fetcher), (source.fetcher, []))[1].extend(reads)
    for fetcher, reads in fetchers.values():
        fetcher.schedule(reads)


class _Stream:
    """What the workers of one streamed pass share: the blocks still to do, the progress, the first
    error. `depth`: the pass is every task's prepass of that depth (None: the combine, written)."""

    def __init__(self, tasks: list[TensorTask], writer: ShardWriter, on_progress: ProgressCallback | None,
                 non_finite: NonFinite, *, depth: int | None = None, work_done: float = 0.0):
        self.tasks, self.depth = tasks, depth
        # what progress says this pass does: a prepass names itself ("TIES thresholds: ..."), the merge nothing
        labels = sorted({task.prepasses[depth].label for task in tasks}) if depth is not None else []
        self.label = f"pass {depth + 1}: {', '.join(labels)}" if labels else ""
        self.writer, self.on_progress, self.non_finite = writer, on_progress, non_finite
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.blocks_left: dict[str, int] = {}  # per tensor, set as its blocks are handed out
        self.block_work: dict[str, float] = {}  # per tensor, the work of one of its blocks in this pass
        blocks = list(self._blocks(tasks))
        announce_reads(blocks)
        self.blocks = iter(blocks)
        self.tensors_done, self.work_done = 0, work_done

    def _blocks(self, tasks: list[TensorTask]) -> Iterator[tuple[TensorTask, tuple[int, int] | None]]:
        for task in tasks:
            blocks = list(iter_row_blocks(task.sources[0].tensors[task.out.name], task.block_elements,
                                          align=self.writer.row_align(task.out.name)))
            if self.depth is not None:
                prepass = task.prepasses[self.depth]
                blocks, work = prepass.rows(blocks), task.bytes_read * prepass.reads
            else:
                work = task.bytes_read + task.cost  # the combine's share of TensorTask.work
            self.blocks_left[task.out.name] = len(blocks)
            self.block_work[task.out.name] = work / len(blocks)
            for rows in blocks:
                yield task, rows

    def work(self) -> None:
        buffers = ScratchBuffers()
        try:
            while not self.stop.is_set():
                with self.lock:
                    task, rows = next(self.blocks, (None, None))
                if task is None:
                    return
                with requantized(getattr(self.writer, "requantizes", lambda name: False)(task.out.name)):
                    self._merge_block(task, rows, buffers)
        except BaseException as error:  # Ctrl-C included: raised by `stream_tasks` once all have stopped
            with self.lock:
                self.error = self.error or error
            self.stop.set()

    def _merge_block(self, task: TensorTask, rows: tuple[int, int] | None, buffers: ScratchBuffers) -> None:
        name = task.out.name
        blocks = []
        for k, source in enumerate(task.sources):
            info = source.tensors[name]
            nbytes = info.nbytes if rows is None else (rows[1] - rows[0]) * info.row_bytes
            decoded = name in getattr(source, "decoders", ())  # dequantized into a tensor of its own
            blocks.append(source.read(name, rows, buffer=None if decoded else buffers.get(k, nbytes)))
        start = rows[0] * (task.out.numel // task.out.shape[0]) if rows else 0  # the block's first element
        if self.depth is not None:
            task.prepasses[self.depth].fold(blocks, start)
        else:
            out = buffers.tensor("out", block_shape(task, blocks[0]), task.out.dtype)
            merged = task.combine(blocks, out, start) if task.positional else task.combine(blocks, out)
            if merged is not out:
                out.copy_(merged)  # also the cast to the output dtype
            if not finite(out):
                with self.lock:
                    self.non_finite.found(task, blocks)
            self.writer.write(name, out, rows[0] if rows else 0)
        with self.lock:
            self.work_done += self.block_work[name]
            self.blocks_left[name] -= 1
            last = self.blocks_left[name] == 0
            self.tensors_done += last and self.depth is None
            if self.on_progress:
                self.on_progress(self.tensors_done, self.work_done, self.label)
        if last and self.depth is not None:
            task.prepasses[self.depth].task_done()  # every block of this tensor is folded
