"""`collect-stats`: run each model's calibration data through it and save the Gram sums of its
linear layers (regmean/store.py), on one device or as one rank of a torchrun process group.

`plan_stats` decides, for each model of a recipe, whether its statistics are up to date (and reads
its calibration data, so that bad data fails before any model is loaded). `StatsSession.collect`
loads the model, runs the batches under `torch.inference_mode()` with Gram hooks (regmean/grams.py)
and writes the sums. Under `torchrun`, each rank takes every WORLD_SIZE-th example, and the sums are
all-reduced (gloo on CPU, nccl on GPU) before rank 0 writes them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import StatsError, UsageError
from mergecli.io.checkpoint import Checkpoint, open_checkpoint
from mergecli.recipe import ModelSpec, Recipe, RegMeanSettings
from mergecli.regmean.calibration import (
    CalibrationData,
    count_text_examples,
    image_batches,
    pad_id,
    read_examples,
    text_batches,
    tokenize_examples,
)
from mergecli.regmean.grams import GramCollector
from mergecli.regmean.layers import find_linear_layers
from mergecli.regmean.store import save_stats, stats_meta, stats_problem, weights_digest

StatsProgress = Callable[[int, int], None]  # (examples done, real tokens done)


@dataclass
class StatsJob:
    """One model's statistics: where they go, whether they are up to date, and its data."""

    spec: ModelSpec
    index: int  # position in the recipe's models
    directory: Path  # stats_dir / name
    checkpoint: Checkpoint
    fingerprint: str
    data: CalibrationData
    settings: RegMeanSettings
    shard_size: int
    up_to_date: bool
    reason: str  # why it is (re)computed, or why it is skipped
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label(self) -> str:
        return f"models.{self.index} ({self.spec.name})"

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


def plan_stats(recipe: Recipe, *, models: list[str] | tuple[str, ...] = (), force: bool = False) -> list[StatsJob]:
    """Check the selected models' checkpoints and calibration data; say which need statistics.

    Args:
        recipe: a regmean recipe.
        models: model names to collect (default: all).
        force: recompute even statistics that are up to date.

    Raises:
        UsageError: unknown model name, a model without `data`, missing data.
        StatsError: empty or malformed data.
        InputNotFoundError, CheckpointError: a model that cannot be opened.
    """
    names = [m.name for m in recipe.models]
    unknown = [n for n in models if n not in names]
    if unknown:
        raise UsageError(f"--model {unknown[0]}: no such model in the recipe", hint=f"models: {', '.join(names)}")
    selected = [(i, m) for i, m in enumerate(recipe.models) if not models or m.name in models]
    missing = [f"models.{i} ({m.name})" for i, m in selected if not m.data]
    if missing:
        raise UsageError(f"{', '.join(missing)}: no calibration `data`",
                         hint="set `data` (a .jsonl / .txt file or an image folder) for every model")
    settings = recipe.regmean
    jobs = []
    try:
        for index, spec in selected:
            label = f"models.{index} ({spec.name})"
            data = read_examples(spec.data, num_examples=settings.num_examples,
                                 text_field=settings.text_field, label=f"{label}.data")
            checkpoint = open_checkpoint(spec.path, revision=spec.revision)
            directory = Path(settings.stats_dir) / spec.name
            job = StatsJob(spec, index, directory, checkpoint, checkpoint.fingerprint(), data, settings,
                           recipe.shard_size, False, "", list(data.warnings))
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
    return jobs


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def compute_dtype(checkpoint: Checkpoint, device: str) -> torch.dtype:
    """The dtype to run a model in: on CPU float32 (half precision is slow there), or float64 for a
    float64 checkpoint; on GPU the checkpoint's own dtype."""
    dtypes = [t.dtype for t in checkpoint.tensors.values() if t.dtype.is_floating_point]
    stored = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    if device.startswith("cpu"):
        return torch.float64 if stored == torch.float64 else torch.float32
    return stored


def load_model(directory: Path, *, dtype: torch.dtype, device: str, label: str) -> torch.nn.Module:
    """Load a checkpoint directory with the class named in its config (so that module paths match
    the checkpoint's tensor names), else `AutoModel`."""
    import transformers

    _quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise StatsError(f"{label}: transformers cannot read {directory / 'config.json'}: {_first_line(exc)}",
                         hint="RegMean statistics need a model that transformers can load") from None
    model_class = next((getattr(transformers, name) for name in config.architectures or []
                        if hasattr(transformers, name)), transformers.AutoModel)
    try:
        model = model_class.from_pretrained(directory, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise StatsError(f"{label}: transformers cannot load {directory}: {_first_line(exc)}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval().to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _max_positions(model: torch.nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class StatsSession:
    """Collects statistics on one device; under torchrun, one rank of a process group.

    Example:
        >>> with StatsSession("cpu") as session:
        ...     for job in plan_stats(recipe):
        ...         if not job.up_to_date:
        ...             session.collect(job)
    """

    def __init__(self, device: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise UsageError(f"--device {device}: expected cpu or cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available", hint="use --device cpu")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        self.device = device
        self._group = False
        if device == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            self.device = f"cuda:{local_rank}"
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
                self._group = True

    def __enter__(self) -> StatsSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False

    def collect(self, job: StatsJob, *, on_progress: StatsProgress | None = None,
                share_inputs: bool = True) -> StatsResult:
        """Run the job's calibration data through its model and write its statistics (rank 0).

        Raises:
            StatsError: the model cannot be loaded or run, or has no linear layers.
        """
        started = time.perf_counter()
        warnings = list(job.warnings)
        with open_checkpoint(job.spec.path, revision=job.spec.revision) as checkpoint:
            model = load_model(job.checkpoint.directory, dtype=compute_dtype(checkpoint, self.device),
                               device=self.device, label=job.label)
            layers, unmatched = find_linear_layers(model, checkpoint.tensors)
            digest = weights_digest(checkpoint, [layer.weight for layer in layers])
        if not layers:
            raise StatsError(f"{job.label}: the model has no linear layers (nn.Linear / Conv1D) with "
                             "weights in the checkpoint, so RegMean has nothing to merge",
                             hint="merge it with `mergecli average`")
        if unmatched:
            warnings.append(f"{job.label}: {len(unmatched)} linear layer(s) have no weight of their own in "
                            f"the checkpoint and are averaged: {_some(unmatched)}")
        batches, max_length = self._batches(job, model, warnings)
        collector = GramCollector(model, layers, share_inputs=share_inputs)
        examples = tokens = 0
        forward = self._forward(model, job)
        if on_progress:
            on_progress(0, 0)  # the model is loaded: the calibration starts now
        with collector, torch.inference_mode():
            for batch in batches:
                real = int(batch.mask.sum()) if batch.mask is not None else None  # on the CPU, no sync
                batch = batch.to(self.device, _float_dtype(model))
                collector.begin_batch(batch.mask, real_tokens=real)
                try:
                    forward(**batch.inputs)
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    memory = "out of memory" in str(exc).lower()
                    raise StatsError(f"{job.label}: the forward pass failed: {_first_line(exc)}",
                                     hint="lower regmean.batch_size or max_length" if memory else None) from None
                examples += batch.examples
                tokens += real if real is not None else collector.batch_rows
                if on_progress:
                    on_progress(examples, tokens)
        del model, forward
        collector.finish()
        if self.world > 1:
            examples, tokens = self._all_reduce(collector, examples, tokens)
        reached = [layer for layer in layers if layer.module in collector.gram_of]
        if len(reached) < len(layers):
            missed = [layer.module for layer in layers if layer.module not in collector.gram_of]
            warnings.append(f"{job.label}: {len(missed)} linear layer(s) were not run by the calibration data "
                            f"and are averaged: {_some(missed)}")
        size = 0
        if self.rank == 0:
            settings = job.data_settings()
            settings["examples_used"] = examples
            if max_length:
                settings["max_length_used"] = max_length
            meta = stats_meta(model=job.name, source=job.spec.path, revision=job.checkpoint.commit,
                              fingerprint=job.fingerprint, data=settings, examples=examples, tokens=tokens,
                              layers=reached, gram_of=collector.gram_of, gram_tokens=collector.tokens)
            if len(reached) < len(layers):
                with open_checkpoint(job.spec.path, revision=job.spec.revision) as checkpoint:
                    digest = weights_digest(checkpoint, [layer.weight for layer in reached])
            meta["weights_sha256"] = digest
            size = save_stats(job.directory, meta=meta, sums=collector.sums, tokens=collector.tokens,
                              shard_size=job.shard_size)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return StatsResult(job.name, job.directory, examples, tokens, len(reached), len(collector.sums), size,
                           time.perf_counter() - started, warnings)

    def _batches(self, job: StatsJob, model: torch.nn.Module, warnings: list[str]) -> tuple[Iterator, int]:
        shard = (self.rank, self.world)
        settings = job.settings
        if len(job.data.examples) < self.world:
            raise UsageError(f"{job.label}: {len(job.data.examples)} examples cannot be split across "
                             f"{self.world} processes", hint="use fewer processes or more examples")
        directory = job.checkpoint.directory
        if job.data.kind == "image":
            processor = _load_processor(directory, job.label)
            return image_batches(job.data.examples, processor, batch_size=settings.batch_size, shard=shard), 0
        max_length = settings.max_length
        limit = _max_positions(model)
        if limit is not None and max_length > limit:
            warnings.append(f"{job.label}: max_length {max_length} is more than the model's {limit} positions; "
                            f"examples are truncated to {limit} tokens")
            max_length = limit
        tokenizer = _load_tokenizer(directory, job.label)
        token_ids = tokenize_examples(job.data.examples, tokenizer, max_length=max_length,
                                      label=f"{job.label}.data")
        if not count_text_examples(token_ids, shard):
            raise StatsError(f"{job.label}: the calibration examples tokenize to nothing")
        return text_batches(token_ids, batch_size=settings.batch_size, pad_token_id=pad_id(tokenizer),
                            shard=shard), max_length

    @staticmethod
    def _forward(model: torch.nn.Module, job: StatsJob) -> Callable:
        # A dual encoder (CLIP) given images runs its image tower only.
        if job.data.kind == "image" and hasattr(model, "get_image_features"):
            return model.get_image_features
        return model

    def _all_reduce(self, collector: GramCollector, examples: int, tokens: int) -> tuple[int, int]:
        import torch.distributed as dist

        layout = (sorted(collector.sums), sorted(collector.gram_of.items()))
        layouts: list[Any] = [None] * self.world
        dist.all_gather_object(layouts, layout)
        if any(other != layout for other in layouts):
            raise StatsError("the processes saw different layers; cannot add their statistics")
        with torch.inference_mode():
            for key in layout[0]:
                dist.all_reduce(collector.sums[key])
        counts = torch.tensor([collector.tokens[k] for k in layout[0]] + [examples, tokens], dtype=torch.int64,
                              device=next(iter(collector.sums.values())).device)
        dist.all_reduce(counts)
        values = counts.tolist()
        for key, value in zip(layout[0], values):
            collector.tokens[key] = value
        return values[-2], values[-1]


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _load_tokenizer(directory: Path, label: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatsError(f"{label}: cannot load the tokenizer of {directory}: {_first_line(exc)}",
                         hint="text calibration data needs the checkpoint's tokenizer files") from None


def _load_processor(directory: Path, label: str) -> Any:
    import transformers

    if not (directory / "preprocessor_config.json").is_file():
        raise StatsError(f"{label}: {directory} has no preprocessor_config.json",
                         hint="image calibration data needs the checkpoint's image processor")
    try:
        return transformers.AutoImageProcessor.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatsError(f"{label}: cannot load the image processor of {directory}: {_first_line(exc)}") from None


def _some(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
