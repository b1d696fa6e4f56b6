"""RegMean's tasks from collected statistics: every hooked linear weight with statistics in every
model is solved in closed form (regmean/solve.py); everything else is averaged.

Every model's statistics are checked against its checkpoint first (fingerprint and weights), and
compared with the recipe's data settings; no Gram matrix is read until its layer is merged.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from mergecli.errors import MergecliError, StatsError
from mergecli.io.checkpoint import Checkpoint
from mergecli.methods.base import Inputs, TensorTask
from mergecli.methods.regmean.solve import regmean_task
from mergecli.recipe import Recipe, model_label
from mergecli.stats.calibration import read_examples
from mergecli.stats.store import DATA_KEYS, LayerStats, ModelStats, check_source, data_changes, load_stats


def load_recipe_stats(recipe: Recipe, checkpoints: list[Checkpoint]) -> tuple[list[ModelStats], list[str]]:
    """Every model's statistics, checked against its checkpoint; all problems reported at once.

    Returns:
        The statistics in recipe order, and warnings (data settings changed since collection).

    Raises:
        StatsError: statistics missing, corrupt, of another format version or of another model.
    """
    settings = recipe.settings
    problems: list[str] = []
    warnings: list[str] = []
    loaded = []
    for index, (spec, checkpoint) in enumerate(zip(recipe.models, checkpoints)):
        label = model_label(index, spec)
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


def _read_gram(stats: ModelStats, layer: LayerStats) -> tuple[torch.Tensor, int]:
    return stats.read_gram(layer.gram), layer.tokens


def _check_layer(name: str, shape: tuple[int, ...], layer: LayerStats, label: str) -> None:
    in_features = shape[1] if layer.orientation == "out_in" else shape[0]
    if len(shape) != 2 or in_features != layer.in_features:
        raise StatsError(f"{label}: statistics for {name} are for {layer.in_features} inputs, but the "
                         f"weight has shape {list(shape)}", hint="mergecli regmean collect-stats RECIPE --force")


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
    some = sorted(set.union(*(set(s.layers) for s in stats)) - hooked)
    if some:
        warnings.append(f"regmean: {len(some)} linear weight(s) have statistics in only some models "
                        f"and are averaged: {', '.join(some[:5])}")
    dead: list[str] = []
    for position, task in enumerate(tasks):
        if task.kind == "average" and task.out.name in hooked:
            layers = [s.layers[task.out.name] for s in stats]
            for index, layer in enumerate(layers):
                _check_layer(task.out.name, task.out.shape, layer, model_label(index, recipe.models[index]))
            sources = [partial(_read_gram, model_stats, layer) for model_stats, layer in zip(stats, layers)]
            tasks[position] = regmean_task(task, sources, recipe, warnings, orientation=layers[0].orientation,
                                           in_features=layers[0].in_features)
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
