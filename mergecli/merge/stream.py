"""The streaming loop: a reader thread reads the next row blocks of every input, this thread
combines the current ones, and a writer thread writes the results in place; at most a few blocks
are alive at once, whatever the model, shard or tensor size.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field

import torch

from mergecli.errors import NonFiniteError
from mergecli.io.buffers import BufferRing
from mergecli.io.checkpoint import iter_row_blocks
from mergecli.io.safetensors import TensorInfo
from mergecli.io.writer import ShardWriter
from mergecli.methods.average import CHUNK_ELEMENTS
from mergecli.methods.base import TensorTask

PREFETCH_DEPTH = 2  # block sets read ahead of the one being combined
WRITE_DEPTH = 2  # merged blocks handed to the writer thread and not yet written
ProgressCallback = Callable[[int, int], None]  # (tensors done, bytes read so far)


def rows_elements(info: TensorInfo, block_elements: int) -> Iterator[int]:
    """The number of elements of each row block `iter_row_blocks` makes of `info`."""
    per_row = info.numel // info.shape[0] if info.shape and info.shape[0] else info.numel
    for rows in iter_row_blocks(info, block_elements):
        yield info.numel if rows is None else (rows[1] - rows[0]) * per_row


def peak_memory(tasks: list[TensorTask]) -> int:
    """Estimated peak bytes of `stream_tasks` above the interpreter: the read-ahead block sets, the
    accumulator chunk, the output ring and what a combine allocates."""
    peak = 0
    for task in tasks:
        info = task.sources[0].tensors[task.out.name]
        elements = max(rows_elements(info, task.block_elements))
        read = sum(s.tensors[task.out.name].dtype.itemsize for s in task.sources) * elements
        peak = max(peak, (PREFETCH_DEPTH + 2) * read + 8 * CHUNK_ELEMENTS
                   + elements * (WRITE_DEPTH + 1) * task.out.dtype.itemsize + task.work_bytes)
    return peak


def block_shape(task: TensorTask, first: torch.Tensor) -> tuple[int, ...]:
    """The shape of one merged row block: the first input block's rows, the output's other dims."""
    return tuple(task.out.shape) if not task.out.shape else (first.shape[0], *task.out.shape[1:])


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
    """Every task's row blocks, `pread` into a ring of buffers (on the reader thread)."""
    ring = BufferRing(PREFETCH_DEPTH + 2)
    for task in tasks:
        name = task.out.name
        blocks = list(iter_row_blocks(task.sources[0].tensors[name], task.block_elements))
        for i, rows in enumerate(blocks):
            buffers = ring.next()
            tensors = []
            for k, source in enumerate(task.sources):
                info = source.tensors[name]
                nbytes = info.nbytes if rows is None else (rows[1] - rows[0]) * info.row_bytes
                tensors.append(source.read(name, rows, buffer=buffers.get(k, nbytes)))
            yield task, rows[0] if rows else 0, tensors, i == len(blocks) - 1


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
            message = f"{name}: NaN or inf in the input {', '.join(bad)}"
        else:
            message = (f"{name}: the merged values are not finite (they overflow "
                       f"{str(task.out.dtype).removeprefix('torch.')})")
        if not self.allow:
            raise NonFiniteError(message, tensor=name)
        if message not in self.warnings:
            self.warnings.append(message + "; kept, as allow_non_finite asks")


def stream_tasks(tasks: list[TensorTask], writer: ShardWriter, on_progress: ProgressCallback | None = None, *,
                 non_finite: NonFinite | None = None) -> None:
    """Read (reader thread) → combine (this thread) → write (writer thread), all overlapped.

    Each block is combined into a buffer of the output ring, in the output dtype (a combine that
    returns another tensor has it copied there, which is also its cast), and handed to the writer
    thread. At most WRITE_DEPTH writes are in flight after each hand-over, so while block i is
    combined only blocks i - 1 and i - 2 can be: a ring of WRITE_DEPTH + 1 buffers never refills
    one that is still being written.
    """
    outputs = BufferRing(WRITE_DEPTH + 1)
    non_finite = non_finite or NonFinite()
    tensors_done = bytes_done = 0
    # closing(): the reader thread is stopped and joined here, even on Ctrl-C, not whenever the
    # generator happens to be collected (a reader still inside torch at interpreter exit aborts it).
    with compute_threads(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergecli-writer") as pool, \
            closing(prefetched(_read_blocks(tasks), PREFETCH_DEPTH)) as blocks_read:
        in_flight: deque[Future] = deque()
        try:
            for task, row_start, blocks, last in blocks_read:
                out = outputs.next().tensor("out", block_shape(task, blocks[0]), task.out.dtype)
                merged = task.combine(blocks, out)
                if merged is not out:
                    out.copy_(merged)  # also the cast to the output dtype
                if len(in_flight) == WRITE_DEPTH:
                    in_flight.popleft().result()
                if not finite(out):
                    non_finite.found(task, blocks)
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
