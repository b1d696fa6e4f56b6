"""What the methods that work on whole matrices share (TSV-M, Iso-C, Iso-CTS, WUDI, after FusionBench 0.2.33):
each 2-D tensor's merged task vector is computed from the models' task vectors τ_i = w_i (θ_i − θ_b), read
whole, one model at a time (never stacked), on CPU or `--device`; θ = θ_b + scale · that. A tensor of
another rank gets the mean of the task vectors, scaled alike, streamed in row blocks as task arithmetic is.

The base's tensor is the task's one block; the models' tensors are read by the combine itself, one after
the other, so that at most one task vector is in memory beside what the method keeps of the others
(factors, a Gram matrix). The models' weights scale their task vectors (FusionBench's `alpha` list for
TSV-M); they are 1 unless the recipe says otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from mergecli.methods.average import accumulation_dtype
from mergecli.methods.base import FLOPS_PER_BYTE, TensorTask
from mergecli.methods.task_vectors import TaskVectorMethod, deltas

# (the task vectors, read one at a time on the device, in float32 or float64; how many there are) → the
# merged task vector (on the device)
Merge = Callable[[Callable[[], Iterator[torch.Tensor]], int], torch.Tensor]


class Placement:
    """Where one merge's matrix work runs: `--device`, until a tensor does not fit there; then on the CPU,
    said once (a warning), for that tensor and the ones after it."""

    def __init__(self, device: str, warnings: list[str]):
        self.device = device
        self.warnings = warnings
        self.lock = threading.Lock()

    def run(self, name: str, work: Callable[[str], torch.Tensor]) -> torch.Tensor:
        if self.device == "cpu":
            return work("cpu")
        try:
            return work(self.device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            with self.lock:
                self.warnings.append(f"{name} does not fit in {self.device}'s memory: it and the tensors after it "
                                     "are computed on the CPU")
                self.device = "cpu"
            return work("cpu")


class WholeMatrixMethod(TaskVectorMethod):
    """A task-vector method whose 2-D tensors are merged whole by `merge`; others by the mean."""

    needs_base: ClassVar[bool] = True
    normalize_default = False
    flops: ClassVar[float] = 0.0  # the work per tensor, in units of m·n·min(m, n) (an SVD's), for progress

    def scale(self, settings: Any) -> float:
        """What the merged task vector is multiplied by."""
        return 1.0

    def matrix_merge(self, settings: Any) -> Merge:
        """How one 2-D tensor's task vectors are merged."""
        raise NotImplementedError

    def tasks(self, recipe, inputs, tasks, warnings):
        self.placement = Placement(inputs.device, warnings)
        return super().tasks(recipe, inputs, tasks, warnings)

    def task_for(self, recipe, inputs, task, read, shared, here):
        divisor = self.divisor(recipe, here)
        weights = [weight / divisor for _, _, weight in read]
        scale = self.scale(here.settings)
        name = task.out.name
        if len(task.out.shape) != 2:
            mean = scale / len(read)

            def average(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
                base, vectors = deltas(blocks, out.dtype)
                for vector, weight in zip(vectors, weights):
                    base.add_(vector, alpha=weight * mean)
                return base.view(out.shape)

            return TensorTask(task.out, self.name, (inputs.base, *(c for _, c, _ in read)), average,
                              task.block_elements, independent_blocks=True, t=task.t)
        merge = self.matrix_merge(here.settings)
        placement = self.placement

        def combine(blocks: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            dtype = accumulation_dtype([blocks[0].dtype, *(c.tensors[name].dtype for _, c, _ in read)], out.dtype)

            def work(device: str) -> torch.Tensor:
                base = blocks[0].to(device=device, dtype=dtype)

                def vectors() -> Iterator[torch.Tensor]:
                    for (_, checkpoint, _), weight in zip(read, weights):
                        vector = checkpoint.read(name).to(device=device, dtype=dtype).sub_(base)
                        yield vector.mul_(weight) if weight != 1.0 else vector

                merged = merge(vectors, len(read))
                return base.add_(merged, alpha=scale).to("cpu")

            return placement.run(name, work)

        rows, columns = task.out.shape
        svd = rows * columns * min(rows, columns) * self.flops
        read_bytes = sum(c.tensors[name].nbytes for _, c, _ in read)
        held = rows * columns * 4  # float32 (8 for float64 inputs: the estimate is for the common case)
        return TensorTask(task.out, self.name, (inputs.base,), combine, task.out.numel, independent_blocks=False,
                          cost=read_bytes + svd / FLOPS_PER_BYTE, work_bytes=4 * held, t=task.t)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor U Vᵀ of a matrix's SVD U S Vᵀ (its nearest matrix with orthonormal columns or
    rows)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh
