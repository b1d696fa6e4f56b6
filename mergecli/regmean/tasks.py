"""RegMean's tasks: every hooked linear weight with statistics in every model is solved in closed
form (methods/regmean.py) from the Gram matrices collect-stats stored; everything else is averaged.

A "regmean" task streams an `nn.Linear` weight in row blocks like any other tensor: at its first
block the `combine` reads the layer's n Gram matrices (one file read each) and factors Σ G̃, solves
every block as it comes, and drops the Grams after the last, so that one layer's statistics are in
memory at a time. Every model's statistics are checked against its checkpoint first.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mergecli.errors import MergecliError, StatsError
from mergecli.io.checkpoint import Checkpoint
from mergecli.merge.tasks import Combine
from mergecli.methods.base import Inputs, TensorTask
from mergecli.methods.regmean import RegMeanAccumulator
from mergecli.recipe import Recipe
from mergecli.regmean.calibration import read_examples
from mergecli.regmean.store import DATA_KEYS, LayerStats, ModelStats, check_source, data_changes, load_stats

WHOLE_TENSOR = sys.maxsize  # a Conv1D weight `[in, out]` is read whole: the solve mixes all its rows
BLOCK_ROWS = 256  # an nn.Linear weight is read in blocks of this many output rows


def load_recipe_stats(recipe: Recipe, checkpoints: list[Checkpoint]) -> tuple[list[ModelStats], list[str]]:
    """Every model's statistics, checked against its checkpoint; all problems reported at once.

    Returns:
        The statistics in recipe order, and warnings (data settings changed since collection).

    Raises:
        StatsError: statistics missing, corrupt, of another format version or of another model.
    """
    settings = recipe.regmean
    problems: list[str] = []
    warnings: list[str] = []
    loaded = []
    for index, (spec, checkpoint) in enumerate(zip(recipe.models, checkpoints)):
        label = f"models.{index} ({spec.name})"
        data_exists = Path(spec.data).exists()
        try:
            stats = load_stats(Path(settings.stats_dir) / spec.name, label=label)
            check_source(stats, checkpoint, label=label)
        except StatsError as exc:
            extra = "" if data_exists else f" (and its data {spec.data} does not exist)"
            problems.append(exc.message + extra)
            continue
        loaded.append(stats)
        if not data_exists:
            warnings.append(f"{label}: calibration data {spec.data} does not exist; using the statistics "
                            f"collected from it earlier")
            continue
        try:
            data = read_examples(spec.data, num_examples=settings.num_examples, text_field=settings.text_field,
                                 label=f"{label}.data")
        except MergecliError as exc:
            warnings.append(f"{exc.message}; using the statistics collected earlier")
            continue
        current = {"kind": data.kind, "sha256": data.sha256, "num_examples": settings.num_examples,
                   "max_length": settings.max_length, "text_field": settings.text_field}
        changes = data_changes(stats, {k: current[k] for k in DATA_KEYS})
        if changes:
            warnings.append(f"{label}: the statistics were collected with other data settings "
                            f"({'; '.join(changes)}); rerun collect-stats to use the recipe's")
    if problems:
        raise StatsError("\n".join(problems), hint="mergecli regmean collect-stats RECIPE "
                                                   "(add --force to recompute existing statistics)")
    return loaded, warnings


def _check_layer(name: str, shape: tuple[int, ...], layer: LayerStats, label: str) -> None:
    in_features = shape[1] if layer.orientation == "out_in" else shape[0]
    if len(shape) != 2 or in_features != layer.in_features:
        raise StatsError(f"{label}: statistics for {name} are for {layer.in_features} inputs, but the "
                         f"weight has shape {list(shape)}", hint="mergecli regmean collect-stats RECIPE --force")


def keeps_grams(d_in: int, d_out: int, models: int) -> bool:
    """For a weight solved whole: hold the n Grams and solve in column blocks (a wide layer), or
    sum Σ G̃ Wᵀ as the models come?"""
    return models * d_in < d_out


def work_bytes(d_in: int, d_out: int, models: int, *, streamed: bool, block_rows: int) -> int:
    """Memory the solve of one layer allocates (float64), besides its weights and its output."""
    if streamed or keeps_grams(d_in, d_out, models):
        rows = block_rows if streamed else min(d_in, d_out)
        # the n G̃_i, Σ G̃ and its factor; per block: right-hand side, fallback, one Wᵀ, the solution
        return 8 * ((models + 2) * d_in * d_in + 4 * d_in * rows)
    # Σ G̃ and one model's G̃, the factor; Σ G̃ Wᵀ, Σ w Wᵀ, one Wᵀ and the solution
    return 8 * (3 * d_in * d_in + 4 * d_in * d_out)


@dataclass
class _Stream:
    """A weight being merged block by block: its Grams (factored) and the rows done."""

    accumulator: RegMeanAccumulator | None = None
    rows: int = 0


def regmean_combine(name: str, layers: list[LayerStats], stats: list[ModelStats], weights: list[float], *,
                    shape: tuple[int, ...], out_dtype: torch.dtype, ratio: float,
                    warnings: list[str]) -> Combine:
    """The combine of one linear weight: W_Mᵀ = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ.

    An `nn.Linear` weight `[out, in]` arrives in row blocks, which are column blocks of Wᵀ: the
    layer's n Grams are read (one at a time) and Σ G̃ factored at its first block, each block is
    solved as it comes, and the Grams are dropped after its last. A Conv1D weight `[in, out]`
    arrives whole (its rows are the inputs the solve mixes). Results are written straight into
    tensors of the output dtype.
    """
    orientation = layers[0].orientation
    stream = _Stream()

    def load(keep_grams: bool, weights_t: list[torch.Tensor] | None = None) -> RegMeanAccumulator:
        accumulator = RegMeanAccumulator(ratio=ratio, keep_grams=keep_grams)
        for i, (layer, model_stats, weight) in enumerate(zip(layers, stats, weights)):
            gram = model_stats.read_gram(layer.gram)  # (d_in, d_in) sum over `layer.tokens` tokens
            accumulator.add(gram, weights_t[i] if weights_t else None, weight=weight, tokens=layer.tokens)
            del gram
        return accumulator

    def report(accumulator: RegMeanAccumulator) -> None:
        factor = accumulator.factor
        if factor.failed:
            warnings.append(f"regmean: {name}: the system could not be solved; it is the weighted average")
        elif factor.ridge:
            warnings.append(f"regmean: {name}: the system was singular; solved with a ridge of "
                            f"{factor.ridge:g} × its diagonal, towards the weighted average")

    def combine(blocks: list[torch.Tensor]) -> torch.Tensor:
        merged = torch.empty(blocks[0].shape, dtype=out_dtype)
        if orientation == "out_in":
            if stream.accumulator is None:  # the first block of this weight
                stream.accumulator = load(keep_grams=True)
            stream.accumulator.solve_block([block.T for block in blocks], merged.T)
            stream.rows += blocks[0].shape[0]
            if stream.rows == shape[0]:  # the last block: drop the Grams
                report(stream.accumulator)
                stream.accumulator, stream.rows = None, 0
            return merged
        d_in = layers[0].in_features
        accumulator = load(keeps_grams(d_in, blocks[0].numel() // d_in, len(blocks)), blocks)
        accumulator.solve(merged)
        report(accumulator)
        return merged

    return combine


def regmean_task(task: TensorTask, layers: list[LayerStats], stats: list[ModelStats], recipe: Recipe,
                 warnings: list[str]) -> TensorTask:
    """The "regmean" task that replaces the averaging task of one linear weight."""
    name, shape = task.out.name, task.out.shape
    for index, layer in enumerate(layers):
        _check_layer(name, shape, layer, f"models.{index} ({recipe.models[index].name})")
    d_in = layers[0].in_features
    d_out = shape[0] * shape[1] // d_in
    combine = regmean_combine(name, layers, stats, recipe.weights, shape=shape, out_dtype=task.out.dtype,
                              ratio=recipe.regmean.reduce_non_diagonal_ratio, warnings=warnings)
    streamed = layers[0].orientation == "out_in"
    block = BLOCK_ROWS * d_in if streamed else WHOLE_TENSOR
    work = work_bytes(d_in, d_out, len(stats), streamed=streamed, block_rows=max(1, block // d_in))
    return TensorTask(task.out, "regmean", task.sources, combine, block, work)


def regmean_tasks(recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[TensorTask]:
    """The default tasks with a "regmean" task for every linear weight that has statistics in every
    model; reads every model's `stats.json` and Gram headers, no Gram matrix.

    Raises:
        StatsError: statistics missing, stale, corrupt or of another model.
    """
    stats, stats_warnings = load_recipe_stats(recipe, inputs.models)
    warnings.extend(stats_warnings)
    tasks = list(tasks)
    hooked = set.intersection(*(set(s.layers) for s in stats))
    partial = sorted(set.union(*(set(s.layers) for s in stats)) - hooked)
    if partial:
        warnings.append(f"regmean: {len(partial)} linear weight(s) have statistics in only some models "
                        f"and are averaged: {', '.join(partial[:5])}")
    dead: list[str] = []
    for position, task in enumerate(tasks):
        if task.kind == "average" and task.out.name in hooked:
            layers = [s.layers[task.out.name] for s in stats]
            tasks[position] = regmean_task(task, layers, stats, recipe, warnings)
            never = set.intersection(*(set(s.grams[layer.gram].dead_features) for s, layer in zip(stats, layers)))
            if never:
                dead.append(f"{task.out.name} ({len(never)})")
    if not any(task.kind == "regmean" for task in tasks):
        warnings.append("regmean: no linear weight is merged by RegMean (all excluded or without "
                        "statistics); everything was averaged")
    if dead:
        warnings.append(f"regmean: {len(dead)} layer(s) have input features that never fired in any "
                        f"model's calibration data; their weight columns are the weighted average: "
                        f"{', '.join(dead[:5])}{' ...' if len(dead) > 5 else ''}")
    return tasks
