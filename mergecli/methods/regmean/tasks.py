"""RegMean's tasks from collected statistics: every hooked linear weight with statistics in every
model is solved in closed form (regmean/solve.py); everything else is averaged.

Every model's statistics are checked against its checkpoint first (fingerprint and weights), and
compared with the recipe's data settings; no Gram matrix is read until its layer is merged.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from mergecli.errors import MergecliError, StatsError
from mergecli.io.checkpoint import Checkpoint
from mergecli.methods.base import Inputs, TensorTask
from mergecli.methods.regmean.solve import regmean_task
from mergecli.recipe import Recipe, model_label
from mergecli.stats.calibration import read_examples
from mergecli.stats.grams import gram_bytes
from mergecli.stats.layers import find_linear_layers
from mergecli.stats.skeleton import build_skeleton
from mergecli.stats.store import (
    DATA_KEYS,
    STATS_FILE,
    LayerStats,
    ModelStats,
    check_source,
    data_changes,
    load_stats,
)

EXPERT_AVERAGE = "expert-average"  # the kind of an expert's weight averaged for want of tokens


def few_tokens_warning(method: str, few: list[str]) -> str:
    """The warning that names the expert weights averaged for want of calibration tokens."""
    return (f"{method}: expert weight(s) saw fewer calibration tokens than they have inputs in some model, "
            f"and {len(few)} are averaged (tokens per model): {', '.join(few[:5])}{' ...' if len(few) > 5 else ''}")


def load_recipe_stats(recipe: Recipe, checkpoints: list[Checkpoint], *,
                      planning: bool = False) -> tuple[list[ModelStats | None], list[str]]:
    """Every model's statistics, checked against its checkpoint and the recipe's data settings; all
    problems reported at once.

    Args:
        planning: a plan only (validate, --dry-run): statistics not collected yet are None, with a
            note, not an error (their data is checked instead).

    Returns:
        The statistics in recipe order, and notes (data that is gone, statistics still to collect).

    Raises:
        StatsError: statistics missing (unless planning), corrupt, of another format version, of
            another model, or collected from other data settings than the recipe's.
    """
    settings = recipe.settings
    problems: list[str] = []
    warnings: list[str] = []
    loaded: list[ModelStats | None] = []
    to_collect = []
    for index, (spec, checkpoint) in enumerate(zip(recipe.models, checkpoints)):
        label = model_label(index, spec)
        data_exists = Path(spec.data).exists()
        directory = Path(settings.stats_dir) / spec.name
        if planning and not (directory / STATS_FILE).exists():
            read_examples(spec.data, num_examples=settings.num_examples, text_field=settings.text_field,
                          label=f"{label}.data")  # the data a collection will read must be good
            loaded.append(None)
            to_collect.append(spec.name)
            continue
        try:
            stats = load_stats(directory, label=label)
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
        if changes:  # the output's mergecli.toml would record data the statistics did not come from
            problems.append(f"{label}: the statistics in {directory} were collected from other data than the "
                            f"recipe's ({'; '.join(changes)}): collect them again, or set the recipe's data "
                            "settings to those they were collected with")
    if problems:
        raise StatsError("\n".join(problems), hint="mergecli regmean collect-stats RECIPE "
                                                   "(add --force to recompute existing statistics)")
    if to_collect:
        warnings.append(f"regmean: statistics still to be collected for {', '.join(to_collect)} "
                        "(mergecli regmean collect-stats RECIPE); the plan counts every linear layer as merged "
                        "by RegMean")
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
    stats, stats_warnings = load_recipe_stats(recipe, inputs.models, planning=inputs.dry_run)
    warnings.extend(stats_warnings)
    if any(s is None for s in stats):
        return _planned_tasks(recipe, inputs, tasks, stats, warnings)
    tasks = list(tasks)
    hooked = set.intersection(*(set(s.layers) for s in stats))
    some = sorted(set.union(*(set(s.layers) for s in stats)) - hooked)
    if some:
        warnings.append(f"regmean: {len(some)} linear weight(s) have statistics in only some models "
                        f"and are averaged: {', '.join(some[:5])}")
    dead: list[str] = []
    few: list[str] = []
    for position, task in enumerate(tasks):
        if task.kind == "average" and task.out.name in hooked:
            layers = [s.layers[task.out.name] for s in stats]
            for index, layer in enumerate(layers):
                _check_layer(task.out.name, task.out.shape, layer, model_label(index, recipe.models[index]))
            if any(layer.underdetermined for layer in layers):
                tokens = "/".join(str(layer.tokens) for layer in layers)
                tasks[position] = replace(task, kind=EXPERT_AVERAGE,
                                          note=f"{task.out.name} ({tokens} tokens, {layers[0].in_features} inputs)")
                few.append(tasks[position].note)
                continue
            sources = [partial(_read_gram, model_stats, layer) for model_stats, layer in zip(stats, layers)]
            tasks[position] = regmean_task(task, sources, recipe, warnings, models=tuple(inputs.models),
                                           orientation=layers[0].orientation, in_features=layers[0].in_features)
            never = set.intersection(*(set(s.grams[layer.gram].dead_features) for s, layer in zip(stats, layers)))
            if never:
                dead.append(f"{task.out.name} ({len(never)})")
    if not any(task.kind == "regmean" for task in tasks):
        warnings.append("regmean: no linear weight is merged by RegMean (all excluded or without "
                        "statistics); everything was averaged")
    if few:
        warnings.append(few_tokens_warning("regmean", few))
    if dead:
        warnings.append(f"regmean: {len(dead)} layer(s) have input features that never fired in any "
                        f"model's calibration data; their weight columns are the weighted average: "
                        f"{', '.join(dead[:5])}{' ...' if len(dead) > 5 else ''}")
    return tasks


def _not_collected(name: str) -> tuple[torch.Tensor, int]:
    raise StatsError(f"no statistics for {name}", hint="mergecli regmean collect-stats RECIPE")


def _planned_tasks(recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], stats: list[ModelStats | None],
                   warnings: list[str]) -> list[TensorTask]:
    """The tasks of a plan made before every model's statistics exist: every linear layer of the model
    (found on the meta device, no weight read) is planned as merged by RegMean."""
    reference = inputs.models[0]
    skeleton = build_skeleton(reference.directory, reference, device="cpu", label=model_label(0, recipe.models[0]))
    layers = {layer.weight: layer for layer in find_linear_layers(skeleton.model, reference.tensors)[0]}
    planned = []
    for task in tasks:
        layer = layers.get(task.out.name)
        if task.kind != "average" or layer is None:
            planned.append(task)
            continue
        sources = [partial(_read_gram, s, s.layers[layer.weight]) if s is not None and layer.weight in s.layers
                   else partial(_not_collected, task.out.name) for s in stats]
        planned.append(regmean_task(task, sources, recipe, warnings, models=tuple(inputs.models),
                                    orientation=layer.orientation, in_features=layer.in_features))
    experts = [layer for layer in layers.values() if layer.expert is not None]
    if experts:
        per_block = gram_bytes(experts) / len({layer.experts for layer in experts})  # gate and up share a Gram
        size = f"{per_block / 1e9:.1f} GB" if per_block >= 1e8 else f"{per_block / 1e6:.1f} MB"
        warnings.append(f"regmean: {len(experts)} MoE expert weights are planned as merged by RegMean; an expert "
                        "that some model's calibration data routes fewer tokens to than it has inputs will be "
                        f"averaged instead (the statistics will say which). Their Grams take {size} a block while "
                        "they are collected: in rounds of at most memory_budget, each one more forward pass")
    return planned
