"""RegMean statistics: forward hooks → Gram sums of every linear layer's inputs; save, load, check.

`plan_stats` decides, for each model of a recipe, whether its statistics are up to date (and reads
its calibration data, so that bad data fails before any model is loaded). `StatsSession.collect`
loads the model once with transformers, runs the calibration batches under
`torch.inference_mode()` and records, for every `nn.Linear` / HF `Conv1D` whose weight is in the
checkpoint, Σ xᵀx over the real tokens of its input (float32 per batch, summed in float64) and
the number of those tokens. Layers that read the same input tensor (q/k/v, gate/up) share one
matrix, found by the identity of the input tensor during the forward pass.

On disk, `stats_dir/<model name>/` holds `stats.json` (format version, mergecli version, the
checkpoint's fingerprint, data settings, one entry per layer: orientation, input size, Gram key,
token count) and the Gram sums in `grams.safetensors` or `grams-0000i-of-0000N.safetensors`
(float64; sums, not means, so that statistics from several processes add up). A directory is
written into a temporary sibling and renamed into place when complete.

Under `torchrun`, each rank takes every WORLD_SIZE-th example, and the sums are all-reduced
(gloo on CPU, nccl on GPU) before rank 0 writes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergecli import __version__
from mergecli.calibration import (
    CalibrationData,
    count_text_examples,
    image_batches,
    pad_id,
    read_examples,
    text_batches,
    tokenize_examples,
)
from mergecli.checkpoint import DTYPE_CODES, Checkpoint, TensorInfo, open_checkpoint, read_safetensors_header
from mergecli.errors import CheckpointError, StatsError, UsageError
from mergecli.methods.regmean import dead_features
from mergecli.recipe import ModelSpec, Recipe, RegMeanSettings
from mergecli.writer import atomic_directory

STATS_FORMAT = "mergecli-regmean-stats"
STATS_FORMAT_VERSION = 1
STATS_FILE = "stats.json"
GRAM_DTYPE = torch.float64
GRAM_BLOCK = 256  # features per block row of a large Gram matrix (measured best on CPU)
DATA_KEYS = ("kind", "sha256", "num_examples", "max_length", "text_field")  # what makes stats stale
Orientation = Literal["out_in", "in_out"]
StatsProgress = Callable[[int, int], None]  # (examples done, real tokens done)


# ---------------------------------------------------------------------------------------------
# Which layers


@dataclass(frozen=True)
class LinearLayer:
    """A hooked layer: its module path in the loaded model and its weight's checkpoint name."""

    module: str
    weight: str
    orientation: Orientation  # "out_in": nn.Linear `[out, in]`; "in_out": HF Conv1D `[in, out]`
    in_features: int


def _checkpoint_name(module: str, shape: tuple[int, ...], tensors: dict[str, TensorInfo],
                     prefixes: list[str]) -> str | None:
    """The checkpoint tensor holding `module`'s weight; the loaded class may add or drop a prefix
    (`bert.`, `model.`) relative to the class the checkpoint was saved from."""
    parts = module.split(".")
    candidates = [f"{module}.weight"]
    candidates += [".".join(parts[k:]) + ".weight" for k in range(1, len(parts))]
    candidates += [f"{prefix}.{module}.weight" for prefix in prefixes]
    for candidate in candidates:
        info = tensors.get(candidate)
        if info is not None and info.shape == shape:
            return candidate
    return None


def find_linear_layers(model: torch.nn.Module, tensors: dict[str, TensorInfo]) -> tuple[list[LinearLayer],
                                                                                          list[str]]:
    """Every `nn.Linear` / HF `Conv1D` of `model` whose weight is stored in the checkpoint.

    Returns:
        The layers, and the module paths of linear layers with no weight of their own in the
        checkpoint (other than an output layer tied to the input embeddings), whose weights are
        then averaged.
    """
    from transformers.pytorch_utils import Conv1D

    prefixes = sorted({name.split(".", 1)[0] for name in tensors if "." in name})
    try:
        tied = getattr(model.get_input_embeddings(), "weight", None)
    except (AttributeError, NotImplementedError):  # a model without token embeddings
        tied = None
    layers: list[LinearLayer] = []
    unmatched: list[str] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            orientation: Orientation = "out_in"
        elif isinstance(module, Conv1D):
            orientation = "in_out"
        else:
            continue
        shape = tuple(module.weight.shape)
        weight = _checkpoint_name(name, shape, tensors, prefixes)
        if weight is None or weight in used:
            if module.weight is not tied:
                unmatched.append(name)
            continue
        used.add(weight)
        in_features = shape[1] if orientation == "out_in" else shape[0]
        layers.append(LinearLayer(name, weight, orientation, in_features))
    return layers, unmatched


# ---------------------------------------------------------------------------------------------
# Collecting


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The real-token mask of a linear layer's input rows: `mask` for `(batch, seq, d)` inputs,
    flattened for `(batch·seq, d)` ones; None when every row is real (a pooled `(batch, d)`
    input, image patches, no padding)."""
    if mask is not None:
        if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return mask
        if x.dim() == 2 and x.shape[0] == mask.numel():
            return mask.reshape(-1)
    return None


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows `(n, d_in)` of a linear layer's input that can hold real tokens: padding rows are
    dropped (CPU) or zeroed (GPU, where boolean indexing would wait for the device to know the row
    count); a zero row adds nothing to xᵀx."""
    x = x.detach()
    rows = row_mask(x, mask)
    if rows is None:
        return x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        return torch.where(rows[..., None], x, 0).reshape(-1, x.shape[-1])
    return x[rows]


_MIXED_MM = True  # torch.mm(..., out_dtype=float32) works for half inputs on this device


def gram_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """leftᵀ right in float32 (float64 for float64 inputs), for one batch's rows `(n, a)`, `(n, b)`.

    Half-precision rows on a GPU go through a half-precision matrix product with float32 output:
    products of bf16 / fp16 numbers are exact in float32, so this loses nothing against upcasting
    first, and runs on the tensor cores at the speed of the forward pass.
    """
    global _MIXED_MM
    if left.dtype in (torch.bfloat16, torch.float16):
        if _MIXED_MM and left.is_cuda:
            try:
                return torch.mm(left.T, right, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError):
                _MIXED_MM = False
        left, right = left.float(), right.float()
    return left.T @ right


class GramCollector:
    """Forward hooks that add xᵀx of each hooked layer's real-token inputs into float64 sums.

    Args:
        model: the loaded model.
        layers: the layers to hook.
        share_inputs: layers reading the same input tensor share one Gram matrix (keyed by the
            first layer that reads it); False stores one per layer (for comparisons).
        block: Grams of more than `2 * block` features are computed a block row at a time, upper
            triangle only (about half the work), and mirrored by `finish()`.

    Example:
        >>> with GramCollector(model, layers) as collector, torch.inference_mode():
        ...     for batch in batches:
        ...         collector.begin_batch(batch.mask)
        ...         model(**batch.inputs)
        >>> sums = collector.finish()
    """

    def __init__(self, model: torch.nn.Module, layers: list[LinearLayer], *, share_inputs: bool = True,
                 block: int = GRAM_BLOCK):
        self.model = model
        self.layers = {layer.module: layer for layer in layers}
        self.share_inputs = share_inputs
        self.block = block
        self.sums: dict[str, torch.Tensor] = {}  # Gram key → (d_in, d_in) float64
        self.tokens: dict[str, int] = {}  # Gram key → real tokens summed over
        self.gram_of: dict[str, str] = {}  # module → Gram key
        self.batch_rows = 0
        self._mask: torch.Tensor | None = None
        self._real: int | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> GramCollector:
        modules = dict(self.model.named_modules())
        for name in self.layers:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def begin_batch(self, mask: torch.Tensor | None, *, real_tokens: int | None = None) -> None:
        """Call before each forward pass with the batch's real-token mask (and its count, if known
        without asking the GPU)."""
        self._mask = mask
        self._real = real_tokens if real_tokens is not None or mask is None else int(mask.sum())
        self._seen.clear()
        self.batch_rows = 0

    def _hook(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            key = self._shared_key(name, x)
            if key is None:
                key = name
                rows = real_rows(x, self._mask)
                masked = row_mask(x, self._mask) is not None
                self._add(key, rows, self._real if masked and self._real is not None else rows.shape[0])
            if self.gram_of.setdefault(name, key) != key:
                raise StatsError(f"layer {name} shared its input with {key} in one batch but not in "
                                 "another; cannot store its statistics consistently")

        return hook

    def _shared_key(self, name: str, x: torch.Tensor) -> str | None:
        """The Gram key of a layer that already read this very tensor in this forward pass."""
        if not self.share_inputs:
            return None
        entry = self._seen.get(id(x))
        if entry is not None and entry[0]() is x:  # a live weak reference: not a recycled id
            return entry[1]
        self._seen[id(x)] = (weakref.ref(x), name)
        return None

    def _add(self, key: str, rows: torch.Tensor, tokens: int) -> None:
        d = rows.shape[1]  # rows: (n, d_in), of which `tokens` real
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = torch.zeros((d, d), dtype=GRAM_DTYPE, device=rows.device)
            self.tokens[key] = 0
        if d < 2 * self.block or rows.is_cuda:  # on a GPU, one large product beats many blocks
            total.add_(gram_product(rows, rows))  # float32 for one batch, added into float64
        else:
            for start in range(0, d, self.block):  # block row: its diagonal block and rightwards
                stop = min(d, start + self.block)
                total[start:stop, start:].add_(gram_product(rows[:, start:stop], rows[:, start:]))
        self.tokens[key] += tokens
        self.batch_rows = max(self.batch_rows, tokens)

    def finish(self) -> dict[str, torch.Tensor]:
        """The Gram sums, made whole: blocks below the diagonal are mirrored from above it."""
        with torch.inference_mode():  # the sums were created as inference tensors, in the hooks
            for total in self.sums.values():
                d = total.shape[0]
                if d < 2 * self.block:
                    continue
                for start in range(self.block, d, self.block):
                    stop = min(d, start + self.block)
                    total[start:stop, :start].copy_(total[:start, start:stop].T)
        return self.sums


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
            meta = _stats_meta(job, reached, collector, examples, tokens, max_length)
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


# ---------------------------------------------------------------------------------------------
# Saving


def _stats_meta(job: StatsJob, layers: list[LinearLayer], collector: GramCollector, examples: int,
                tokens: int, max_length: int) -> dict[str, Any]:
    settings = job.data_settings()
    settings["examples_used"] = examples
    if max_length:
        settings["max_length_used"] = max_length
    return {
        "format": STATS_FORMAT,
        "format_version": STATS_FORMAT_VERSION,
        "mergecli_version": __version__,
        "model": job.name,
        "source": job.spec.path,
        "revision": job.checkpoint.commit,
        "fingerprint": job.fingerprint,
        "data": settings,
        "examples": examples,
        "tokens": tokens,
        "dtype": "float64",
        "layers": {
            layer.weight: {
                "module": layer.module,
                "gram": collector.gram_of[layer.module],
                "orientation": layer.orientation,
                "in_features": layer.in_features,
                "tokens": collector.tokens[collector.gram_of[layer.module]],
            }
            for layer in layers
        },
        "grams": {},
    }


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write CPU tensors to a safetensors file without building it in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        header[name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for tensor in tensors.values():
            f.write(memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def save_stats(directory: Path, *, meta: dict[str, Any], sums: dict[str, torch.Tensor], tokens: dict[str, int],
               shard_size: int) -> int:
    """Write statistics atomically into `directory` (replacing what is there). Returns the bytes written."""
    keys = list(dict.fromkeys(entry["gram"] for entry in meta["layers"].values()))
    groups: list[list[str]] = [[]]
    used = 0
    for key in keys:
        nbytes = sums[key].numel() * GRAM_DTYPE.itemsize
        if groups[-1] and used + nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += nbytes
    total = 0
    with atomic_directory(directory, force=True) as temporary:
        for number, group in enumerate(groups, start=1):
            filename = ("grams.safetensors" if len(groups) == 1
                        else f"grams-{number:05d}-of-{len(groups):05d}.safetensors")
            tensors = {key: sums[key].to("cpu", GRAM_DTYPE) for key in group}
            metadata = {"format": "pt", "mergecli_stats_format": str(STATS_FORMAT_VERSION),
                        "mergecli_version": __version__, "fingerprint": meta["fingerprint"], "model": meta["model"],
                        "tokens": json.dumps({key: tokens[key] for key in group})}
            total += _write_safetensors(temporary / filename, tensors, metadata)
            for key, tensor in tensors.items():
                meta["grams"][key] = {"file": filename, "in_features": tensor.shape[0], "tokens": tokens[key],
                                      "dead_features": dead_features(tensor).tolist()}
            del tensors
        text = json.dumps(meta, indent=1) + "\n"
        (temporary / STATS_FILE).write_text(text)
        total += len(text)
    return total


# ---------------------------------------------------------------------------------------------
# Loading and checking


@dataclass(frozen=True)
class LayerStats:
    weight: str
    gram: str
    orientation: Orientation
    in_features: int
    tokens: int


@dataclass(frozen=True)
class GramEntry:
    key: str
    file: Path
    offset: int
    in_features: int
    tokens: int
    dead_features: tuple[int, ...]


@dataclass(frozen=True)
class ModelStats:
    """Loaded (checked) statistics of one model; Grams are read one at a time by `read_gram`."""

    directory: Path
    model: str
    fingerprint: str
    weights_sha256: str
    format_version: int
    mergecli_version: str
    data: dict[str, Any]
    examples: int
    tokens: int
    layers: dict[str, LayerStats]  # checkpoint weight name → its statistics
    grams: dict[str, GramEntry]

    def read_gram(self, key: str) -> torch.Tensor:
        """The Gram sum `(d_in, d_in)` float64 stored under `key` (read with pread, no mmap)."""
        entry = self.grams[key]
        out = torch.empty((entry.in_features, entry.in_features), dtype=GRAM_DTYPE)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        try:
            fd = os.open(entry.file, os.O_RDONLY)
        except OSError as exc:
            raise StatsError(f"{entry.file}: cannot read: {exc.strerror or exc}", hint=_RERUN) from None
        try:
            done = 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], entry.offset + done)
                if got == 0:
                    raise StatsError(f"{entry.file}: truncated while reading {key}", hint=_RERUN)
                done += got
        finally:
            os.close(fd)
        if not bool(torch.isfinite(out.diagonal()).all()):
            raise StatsError(f"{entry.file}: Gram matrix {key} holds NaN or inf (corrupt statistics)", hint=_RERUN)
        return out


_RERUN = "recompute them: mergecli regmean collect-stats RECIPE --force"


def load_stats(directory: Path, *, label: str = "") -> ModelStats:
    """Read and check `stats.json` and the headers of the Gram shards of one model.

    Raises:
        StatsError: missing, corrupt, or of another format version.
    """
    prefix = f"{label}: " if label else ""
    index = directory / STATS_FILE
    if not index.is_file():
        raise StatsError(f"{prefix}no RegMean statistics in {directory}",
                         hint="compute them first: mergecli regmean collect-stats RECIPE")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise StatsError(f"{prefix}{index} is corrupt (not mergecli statistics)", hint=_RERUN) from None
    version = meta.get("format_version")
    if version != STATS_FORMAT_VERSION:
        older = isinstance(version, int) and version < STATS_FORMAT_VERSION
        raise StatsError(
            f"{prefix}statistics in {directory} have format version {version} "
            f"(mergecli {meta.get('mergecli_version', '?')}); this mergecli reads version {STATS_FORMAT_VERSION}",
            hint=_RERUN if older or not isinstance(version, int) else "upgrade mergecli to read them",
        )
    try:
        layers = {
            weight: LayerStats(weight, str(e["gram"]), e["orientation"], int(e["in_features"]), int(e["tokens"]))
            for weight, e in meta["layers"].items()
        }
        files: dict[str, dict[str, TensorInfo]] = {}
        grams = {}
        for key, e in meta["grams"].items():
            path = directory / str(e["file"])
            if path.parent != directory or not path.is_file():
                raise StatsError(f"{prefix}{directory}: Gram shard {e['file']} is missing", hint=_RERUN)
            if e["file"] not in files:
                infos, _ = read_safetensors_header(path)
                files[e["file"]] = {info.name: info for info in infos}
            info = files[e["file"]].get(key)
            d = int(e["in_features"])
            if info is None or info.shape != (d, d) or info.dtype != GRAM_DTYPE:
                raise StatsError(f"{prefix}{path}: Gram matrix {key} is missing or has the wrong shape", hint=_RERUN)
            grams[key] = GramEntry(key, path, info.offset, d, int(e["tokens"]),
                                   tuple(int(i) for i in e.get("dead_features", [])))
        stats = ModelStats(directory, str(meta["model"]), str(meta["fingerprint"]), str(meta["weights_sha256"]),
                           version, str(meta.get("mergecli_version", "?")), dict(meta.get("data") or {}),
                           int(meta["examples"]), int(meta["tokens"]), layers, grams)
    except CheckpointError as exc:
        raise StatsError(f"{prefix}{exc.message}", hint=_RERUN) from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StatsError(f"{prefix}{index} is corrupt (missing or malformed entries)", hint=_RERUN) from None
    for layer in layers.values():
        gram = grams.get(layer.gram)
        if gram is None or gram.in_features != layer.in_features or layer.orientation not in ("out_in", "in_out"):
            raise StatsError(f"{prefix}{index} is corrupt (layer {layer.weight})", hint=_RERUN)
        if layer.tokens <= 0:
            raise StatsError(f"{prefix}{index}: layer {layer.weight} has no tokens", hint=_RERUN)
    return stats


def weights_digest(checkpoint: Checkpoint, names: Iterable[str]) -> str:
    """sha256 of the first row of each named weight: tells apart checkpoints of one architecture
    (fine-tunes of one model share a fingerprint) at the cost of a few KB read per layer."""
    digest = hashlib.sha256()
    for name in sorted(names):
        info = checkpoint.tensors.get(name)
        digest.update(f"{name}|".encode())
        if info is not None:
            block = checkpoint.read(name, (0, 1) if info.shape else None)
            digest.update(block.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_problem(stats: ModelStats, checkpoint: Checkpoint) -> str | None:
    """Why `stats` were not collected from `checkpoint`, or None when they were."""
    fingerprint = checkpoint.fingerprint()
    if stats.fingerprint != fingerprint:
        return (f"collected from another model (fingerprint {stats.fingerprint[:12]}, "
                f"the model's is {fingerprint[:12]})")
    if stats.weights_sha256 != weights_digest(checkpoint, stats.layers):
        return "collected from another model of the same architecture (its weights differ)"
    return None


def check_source(stats: ModelStats, checkpoint: Checkpoint, *, label: str) -> None:
    """Refuse statistics collected from another model (or another version of it)."""
    problem = source_problem(stats, checkpoint)
    if problem:
        raise StatsError(f"{label}: the statistics in {stats.directory} were {problem}, not from "
                         f"{checkpoint.source}", hint=_RERUN)


def data_changes(stats: ModelStats, data: dict[str, Any]) -> list[str]:
    """The data settings that differ between the statistics and the recipe (`old → new`)."""
    return [f"{key} {stats.data.get(key)!r} → {data.get(key)!r}" for key in DATA_KEYS
            if key in data and stats.data.get(key) != data[key]]


def stats_problem(directory: Path, *, checkpoint: Checkpoint, data: dict[str, Any]) -> str | None:
    """Why the statistics in `directory` must be (re)computed, or None when they are up to date."""
    if not (directory / STATS_FILE).exists():
        return "no statistics yet"
    try:
        stats = load_stats(directory)
    except StatsError as exc:
        return exc.message
    problem = source_problem(stats, checkpoint)
    if problem:
        return f"the statistics there were {problem}"
    changes = data_changes(stats, data)
    return f"data settings changed: {', '.join(changes)}" if changes else None
