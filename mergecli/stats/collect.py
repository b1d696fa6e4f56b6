"""`collect-stats`: run each model's calibration data through it one block at a time and save the
Gram sums of its linear layers (regmean/store.py), on one device or as one rank of a torchrun group.

`plan_stats` decides, for each model of a recipe, whether its statistics are up to date (and reads
its calibration data, so that bad data fails before any model is loaded). `StatsSession.collect`
builds the model without weights and runs the batches through the modules before the first block,
each block, and the modules after the last (regmean/engine.py), with Gram hooks on that stage's
layers; each stage's sums are written as soon as it is done, so memory holds one block's weights
and Grams, whatever the depth. Under `torchrun`, each rank takes every WORLD_SIZE-th example, and
every stage's sums are all-reduced (gloo on CPU, nccl on GPU) before rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from mergecli.errors import OutputInPlace, StatsError, UsageError
from mergecli.io.adapter_bases import open_model
from mergecli.io.atomic import STATISTICS, atomic_directory, clean_directory, scratch_directory
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.memory import give_back_memory
from mergecli.io.remote import Fetcher
from mergecli.recipe import ModelSpec, model_label
from mergecli.stats.calibration import Batch, CalibrationData, model_batches, read_examples
from mergecli.stats.device import resolve_device
from mergecli.stats.engine import Forward, advance, run_block, run_prefix, run_tail
from mergecli.stats.grams import GramCollector, expert_keys, gram_rounds
from mergecli.stats.hidden import MemoryBudget
from mergecli.stats.layers import LinearLayer, find_linear_layers
from mergecli.stats.settings import CalibrationSettings, require_data
from mergecli.stats.skeleton import Skeleton, build_skeleton, forward_of, hooked, max_positions, stage_layers
from mergecli.stats.store import StatsFiles, stats_meta, stats_problem

StatsProgress = Callable[[int, int], None]  # (blocks done, blocks in all)


@dataclass
class StatsJob:
    """One model's statistics: where they go, whether they are up to date, and its data."""

    spec: ModelSpec
    index: int  # position in the recipe's models
    directory: Path  # stats_dir / name
    checkpoint: Checkpoint
    fingerprint: str
    data: CalibrationData
    settings: CalibrationSettings
    up_to_date: bool
    reason: str  # why it is (re)computed, or why it is skipped
    warnings: list[str] = field(default_factory=list)
    stream: tuple[int, int] | None = None  # `--stream`: (connections, read-ahead bytes) of its hub reads

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return model_label(self.index, self.spec)

    def data_settings(self) -> dict[str, Any]:
        """What the statistics are computed from; a change in `DATA_KEYS` makes them stale."""
        return {"path": str(self.data.path), "kind": self.data.kind, "sha256": self.data.sha256,
                "num_examples": self.settings.num_examples, "max_length": self.settings.max_length,
                "text_field": self.settings.text_field}


@dataclass(frozen=True)
class StatsResult:
    name: str
    directory: Path
    examples: int
    tokens: int
    layers: int
    grams: int
    bytes: int
    seconds: float
    warnings: list[str]
    spilled: int = 0  # bytes of hidden states that went to disk (over the memory budget)

    def as_dict(self) -> dict[str, Any]:
        """For --json: every field, the directory as a string, the time rounded to ms."""
        return {**asdict(self), "directory": str(self.directory), "seconds": round(self.seconds, 3),
                "up_to_date": False}


class StatsReporter(Protocol):
    """What `collect_all` tells its caller (rank 0 only, under torchrun)."""

    def skipped(self, job: StatsJob) -> None:
        """The job's statistics are up to date: nothing is computed."""

    def collecting(self, job: StatsJob) -> AbstractContextManager[StatsProgress]:
        """The job starts: a context whose value is called with (stages done, stages in all)."""

    def collected(self, result: StatsResult) -> None:
        """The job's statistics are written."""


def collect_all(models: list[ModelSpec], settings: CalibrationSettings, *, only: list[str] | tuple[str, ...] = (),
                force: bool = False, device: str = "cpu", reporter: StatsReporter | None = None,
                stream: tuple[int, int] | None = None) -> list[dict[str, Any]]:
    """Collect the statistics of every selected model that needs them, one model after another.

    Returns:
        Per model, what was done (`StatsResult.as_dict`, or `up_to_date` with its directory).

    Raises:
        KeyboardInterrupt: also when one model's statistics were complete as the signal came (the
            command as a whole was not).
    """
    done: list[dict[str, Any]] = []
    with StatsSession(device) as session:
        tell = reporter if session.rank == 0 else None
        for job in plan_stats(models, settings, only=only, force=force, stream=stream):
            if job.up_to_date:
                if tell:
                    tell.skipped(job)
                done.append({"name": job.name, "directory": str(job.directory), "up_to_date": True})
                continue
            with tell.collecting(job) if tell else nullcontext(None) as on_progress:
                try:
                    result = session.collect(job, on_progress=on_progress)
                except OutputInPlace as finished:  # that model's statistics are complete, not the command
                    raise KeyboardInterrupt from finished
            if tell:
                tell.collected(result)
            done.append(result.as_dict())
    return done


def plan_stats(models: list[ModelSpec], settings: CalibrationSettings, *, only: list[str] | tuple[str, ...] = (),
               force: bool = False, stream: tuple[int, int] | None = None) -> list[StatsJob]:
    """Check the selected models' checkpoints and calibration data; say which need statistics.

    Args:
        models: the recipe's models.
        settings: where the statistics go and how the data is read (the method's table).
        only: model names to collect (default: all).
        force: recompute even statistics that are up to date.
        stream: (connections, read-ahead bytes): hub models are read by range requests (`--stream`).

    Raises:
        UsageError: unknown model name, a model without `data`, missing data.
        StatsError: empty or malformed data.
        InputNotFoundError, CheckpointError: a model that cannot be opened.
    """
    names = [m.name for m in models]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UsageError(f"--only {unknown[0]}: no such model in the recipe", hint=f"models: {', '.join(names)}")
    selected = [(i, m) for i, m in enumerate(models) if not only or m.name in only]
    require_data(selected)
    cleaned = clean_directory(Path(settings.stats_dir))  # what killed runs left
    jobs = []
    try:
        for index, spec in selected:
            label = model_label(index, spec)
            data = read_examples(spec.data, num_examples=settings.num_examples,
                                 text_field=settings.text_field, label=f"{label}.data")
            headers = Fetcher(connections=stream[0], buffer=stream[1]) if stream else None  # nothing fetched ahead
            checkpoint = open_model(spec, fetcher=headers)
            directory = Path(settings.stats_dir) / spec.name
            job = StatsJob(spec, index, directory, checkpoint, checkpoint.fingerprint(), data, settings,
                           False, "", list(data.warnings), stream)
            jobs.append(job)
            if checkpoint.directory is None or not (checkpoint.directory / "config.json").is_file():
                raise StatsError(f"{label}: {spec.path} is not a model directory with config.json",
                                 hint="RegMean runs the model with transformers; give its directory")
            problem = stats_problem(directory, checkpoint=checkpoint, data=job.data_settings())
            job.up_to_date = problem is None and not force
            job.reason = "up to date" if problem is None else problem
    except BaseException:
        for job in jobs:
            job.checkpoint.close()
        raise
    for job in jobs:
        job.checkpoint.close()  # only its headers, fingerprint and digest were needed
    if jobs:
        jobs[0].warnings[:0] = cleaned
    return jobs


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) unless torchrun started it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")) if world > 1 else 0), world


class StatsSession:
    """Collects statistics on one device; under torchrun, one rank of a process group.

    Example:
        >>> with StatsSession("cpu") as session:
        ...     for job in plan_stats(recipe):
        ...         if not job.up_to_date:
        ...             session.collect(job)
    """

    def __init__(self, device: str = "cpu"):
        self.device = resolve_device(device)
        self.rank, self.world = process_rank()
        self._group = False
        if self.device != "cpu":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="gloo" if self.device == "cpu" else "nccl")
                self._group = True

    def __enter__(self) -> StatsSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.barrier()  # no rank tears the group down while another still talks to it
            dist.destroy_process_group()
            self._group = False

    def collect(self, job: StatsJob, *, on_progress: StatsProgress | None = None,
                share_inputs: bool = True) -> StatsResult:
        """Run the job's calibration data through its model, block by block, and write its statistics
        (rank 0).

        Raises:
            StatsError: the model cannot be built or run, or has no linear layers.
        """
        started = time.perf_counter()
        warnings = list(job.warnings)
        with contextlib.ExitStack() as stack:
            fetcher = Fetcher(connections=job.stream[0], buffer=job.stream[1]) if job.stream else None
            if fetcher is not None:
                stack.callback(fetcher.close)
            checkpoint = open_model(job.spec, fetcher=fetcher)
            stack.callback(checkpoint.close)
            budget = MemoryBudget(job.settings.memory_budget, scratch_directory(job.directory.parent, "spill"))
            stack.callback(budget.close)
            skeleton, layers, batches, max_length = self._prepare(job, checkpoint, warnings)
            files = None
            if self.rank == 0:  # written into a temporary sibling, renamed into place when complete
                temporary = stack.enter_context(atomic_directory(job.directory, force=True, notes=warnings,
                                                                 kind=STATISTICS))
                files = StatsFiles(temporary, fingerprint=job.fingerprint, model=job.name,
                                   data_sha256=job.data.sha256)
                stack.callback(files.close)
            reached = self._run_stages(skeleton, layers, batches, forward_of(skeleton.model, job.data.kind),
                                       budget, job.name, files, on_progress, share_inputs)
            examples, tokens = self._sum_counts(sum(batch.examples for batch in batches), reached.tokens)
            missed = [layer.module for layer in layers if layer.module not in reached.gram_of]
            if missed:
                warnings.append(f"{job.label}: {len(missed)} linear layer(s) were not run by the calibration "
                                f"data and are averaged: {_some(missed)}")
            ran = [layer for layer in layers if layer.module in reached.gram_of]
            settings = {**job.data_settings(), "examples_used": examples, **({"max_length_used": max_length}
                                                                              if max_length else {})}
            meta = stats_meta(model=job.name, source=job.spec.path, revision=job.checkpoint.commit,
                              fingerprint=job.fingerprint,
                              weights_sha256=checkpoint.first_rows_digest([layer.weight for layer in ran]),
                              data=settings, examples=examples, tokens=tokens, layers=ran,
                              gram_of=reached.gram_of, gram_tokens=reached.gram_tokens)
            if fetcher is not None:  # every byte read from the hub against its sha256, before the statistics count
                fetcher.verify()
            size = files.finish(meta) if files else 0
        return StatsResult(job.name, job.directory, examples, tokens, len(ran), len(reached.gram_tokens), size,
                           time.perf_counter() - started, warnings, budget.spilled)

    def _prepare(self, job: StatsJob, checkpoint: Checkpoint,
                 warnings: list[str]) -> tuple[Skeleton, list[LinearLayer], list[Batch], int]:
        """The model without weights, its linear layers, and this process's batches on the device."""
        skeleton = build_skeleton(job.checkpoint.directory, checkpoint, device=self.device, label=job.label,
                                  images=job.data.kind == "image")
        layers, unmatched = find_linear_layers(skeleton.model, checkpoint.tensors)
        if not layers:
            raise StatsError(f"{job.label}: the model has no linear layers (nn.Linear / Conv1D) with "
                             "weights in the checkpoint, so RegMean has nothing to merge",
                             hint="merge it with `mergecli average`")
        if unmatched:
            warnings.append(f"{job.label}: {len(unmatched)} linear layer(s) have no weight of their own in "
                            f"the checkpoint and are averaged: {_some(unmatched)}")
        batches, max_length = model_batches(
            job.data, job.checkpoint.directory, batch_size=job.settings.batch_size,
            max_length=job.settings.max_length, max_positions=max_positions(skeleton.model),
            shard=(self.rank, self.world), label=job.label, warnings=warnings)
        return skeleton, layers, [batch.to(self.device, skeleton.dtype) for batch in batches], max_length

    def _run_stages(self, skeleton: Skeleton, layers: list[LinearLayer], batches: list[Batch], forward: Forward,
                    budget: MemoryBudget, name: str, files: StatsFiles | None, on_progress: StatsProgress | None,
                    share_inputs: bool) -> _Reached:
        """The prefix, every block and the tail, each with Gram hooks on its layers and written when done."""
        outside, per_block = stage_layers(skeleton, layers)
        reached = _Reached()
        total = len(per_block)
        with GramCollector(hooked(skeleton, outside), share_inputs=share_inputs) as collector:
            acts = run_prefix(skeleton, batches, forward, budget, name, collector=collector)
        reached.tokens = acts.tokens
        self._finish_stage(collector, files, reached, on_progress, total)
        try:
            for index, block_layers in enumerate(per_block):
                rounds = gram_rounds(block_layers, budget.limit)  # a MoE block's experts, a few at a time
                with skeleton.held([skeleton.blocks[index]]) if len(rounds) > 1 else nullcontext():  # read once
                    for number, layers in enumerate(rounds):
                        last = number == len(rounds) - 1
                        with GramCollector(hooked(skeleton, layers), share_inputs=share_inputs,
                                           experts=expert_keys(layers)) as collector:
                            outputs = run_block(skeleton, index, acts, collector=collector, keep=last, name=name)
                        self._finish_stage(collector, files, reached, on_progress, total, stage_done=last)
                advance(acts, outputs)
            tail = [layer for layer in outside if layer.module not in reached.gram_of]
            with GramCollector(hooked(skeleton, tail), share_inputs=share_inputs) as collector:
                if tail:
                    run_tail(skeleton, acts, forward, collector=collector, stop_after={t.module for t in tail})
            self._finish_stage(collector, files, reached, on_progress, total)
        finally:
            acts.close()
        return reached

    def _finish_stage(self, collector: GramCollector, files: StatsFiles | None, reached: _Reached,
                      on_progress: StatsProgress | None, total: int, *, stage_done: bool = True) -> None:
        """Write the Grams a stage (or one round of a block's) summed; count the stage when it is done."""
        for gram in collector.sums.values():
            gram.flush()
        if self.world > 1:
            self._all_reduce(collector)
        reached.gram_of.update(collector.gram_of)
        reached.gram_tokens.update({key: gram.tokens for key, gram in collector.sums.items()})
        if files is not None:
            files.add({key: gram.done() for key, gram in collector.sums.items()},
                      {key: gram.tokens for key, gram in collector.sums.items()})
        give_back_memory()
        if not stage_done:
            return
        reached.stages += 1
        if on_progress:
            on_progress(min(reached.stages - 1, total), total)  # the prefix is block 0 of them, the tail the last

    def _all_reduce(self, collector: GramCollector) -> None:
        import torch.distributed as dist

        layout = (sorted(collector.sums), sorted(collector.gram_of.items()))
        layouts: list[Any] = [None] * self.world
        dist.all_gather_object(layouts, layout)
        if any(other != layout for other in layouts):
            raise StatsError("the processes saw different layers; cannot add their statistics")
        with torch.inference_mode():
            for key in layout[0]:
                for part in collector.sums[key].total:
                    dist.all_reduce(part)
        if layout[0]:
            counts = torch.tensor([collector.sums[k].tokens for k in layout[0]], dtype=torch.int64,
                                  device=collector.sums[layout[0][0]].total[0].device)
            dist.all_reduce(counts)
            for key, value in zip(layout[0], counts.tolist()):
                collector.sums[key].tokens = value

    def _sum_counts(self, examples: int, tokens: int) -> tuple[int, int]:
        if self.world == 1:
            return examples, tokens
        import torch.distributed as dist

        counts = torch.tensor([examples, tokens], dtype=torch.int64,
                              device=self.device if self.device.startswith("cuda") else "cpu")
        dist.all_reduce(counts)
        return tuple(counts.tolist())


@dataclass
class _Reached:
    """What the stages collected: each hooked module's Gram key, each Gram's token count."""

    gram_of: dict[str, str] = field(default_factory=dict)
    gram_tokens: dict[str, int] = field(default_factory=dict)
    stages: int = 0
    tokens: int = 0  # real tokens entering the blocks
