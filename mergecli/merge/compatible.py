"""Whether the inputs of a recipe can be merged: the same tensor names and shapes, every mismatch listed
(and said in a few words where it has one cause: a different depth, a class that prefixes its names),
tensors that transformers does not load dropped, and the inputs' digests as the recipe records them.
"""

from __future__ import annotations

import re
from collections import Counter

from mergecli.errors import CheckpointError, ShapeMismatchError, StatsError, shown
from mergecli.io.architecture import loaded_keys, meta_model, unloaded
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.safetensors import TensorInfo, TensorSpec
from mergecli.methods.base import Inputs
from mergecli.recipe import Recipe, model_label
from mergecli.stats.layers import candidate_names, stored_names

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _label(recipe: Recipe, inputs: Inputs, checkpoint: Checkpoint) -> str:
    return "base" if checkpoint is inputs.base else recipe.models[inputs.models.index(checkpoint)].name


def _architecture(checkpoint: Checkpoint) -> str | None:
    """`llama (LlamaForCausalLM)`, from the checkpoint's config.json; None without one."""
    config = checkpoint.config()
    if config is None:
        return None
    kind, classes = config.get("model_type"), ", ".join(map(str, config.get("architectures") or []))
    return f"{kind} ({classes})" if classes else str(kind) if kind else None


def unloaded_tensors(inputs: Inputs, names: list[str], differing: set[str]) -> set[str]:
    """Tensors that transformers loads for none of the inputs that store them (non-persistent or
    obsolete buffers), each input judged by its own config's class: a layer that only a deeper input
    has is loaded by that input's class, so it is a real difference, never dropped. Asked only when the
    inputs disagree on names or hold buffer-like (integer) tensors."""
    buffer_like = any(not info.dtype.is_floating_point or info.name.endswith(("inv_freq", "masked_bias"))
                      for c in inputs.all for info in c.tensors.values())
    if not (differing or buffer_like) or inputs.reference.directory is None:
        return set()
    dropped = set(names)
    for checkpoint in inputs.all:
        expected = loaded_keys(checkpoint.directory) if checkpoint.directory is not None else None
        if expected is None:
            return set()
        dropped &= unloaded(set(checkpoint.tensors), expected) | (set(names) - set(checkpoint.tensors))
    return dropped


def check_compatible(recipe: Recipe, inputs: Inputs, notes: list[str]) -> set[str]:
    """Every input must hold the same tensor names and shapes; list every mismatch. Tensors matching
    `exclude` need only be in the reference; tensors transformers does not load are dropped.

    Returns:
        The tensors dropped from the output.
    """
    everyone = inputs.all
    names = list(dict.fromkeys(n for c in everyone for n in c.tensors))
    differing = {n for n in names if any(n not in c.tensors for c in everyone)}
    dropped = unloaded_tensors(inputs, names, differing)
    if dropped:
        listed = ", ".join(map(shown, sorted(dropped)[:3])) + (f" and {len(dropped) - 3} more"
                                                                if len(dropped) > 3 else "")
        count = f"{len(dropped)} tensor{'s' * (len(dropped) != 1)}"
        notes.append(f"dropped {count} that transformers does not load for this model "
                     f"(buffers it no longer saves): {listed}")
    excluded = [re.compile(p) for p in recipe.exclude]
    problems = []
    for name in names:
        if name in dropped:
            continue
        holders = [inputs.reference] if any(p.fullmatch(name) for p in excluded) else everyone
        missing = [_label(recipe, inputs, c) for c in holders if name not in c.tensors]
        if missing:
            problems.append(f"{shown(name)}: missing in {', '.join(missing)}")
            continue
        infos = [c.tensors[name] for c in holders]
        if len({i.shape for i in infos}) > 1:
            shapes = ", ".join(f"{_label(recipe, inputs, c)} {list(c.tensors[name].shape)}" for c in holders)
            problems.append(f"{shown(name)}: shapes differ: {shapes}")
        elif len({i.dtype.is_floating_point for i in infos}) > 1:
            dtypes = ", ".join(f"{_label(recipe, inputs, c)} {c.tensors[name].dtype}" for c in holders)
            problems.append(f"{shown(name)}: floating and integer dtypes mixed: {dtypes}")
    if problems:
        kinds = {_label(recipe, inputs, c): _architecture(c) for c in everyone}
        mixed = len({k for k in kinds.values() if k}) > 1
        problems, hint = _in_a_few_words(recipe, inputs, problems)
        if hint is None and any(": missing in " in problem for problem in problems):
            hint = ("merge checkpoints of one architecture and vocabulary size, or `exclude` the tensors only some "
                    "inputs have (they then come from the base, else the first model)")
        raise ShapeMismatchError(problems, architectures=", ".join(f"{label} is {kind}" for label, kind
                                                                  in kinds.items()) if mixed else None, hint=hint)
    return dropped


def _depth(checkpoint: Checkpoint) -> int:
    """The number of repeated layers (blocks) a checkpoint's tensor names count."""
    indices = {int(match.group(1)) for name in checkpoint.tensors if (match := _LAYER.search(name))}
    return max(indices) + 1 if indices else 0


def _in_a_few_words(recipe: Recipe, inputs: Inputs, problems: list[str]) -> tuple[list[str], str | None]:
    """The mismatches, said by their cause where they have one: inputs of different depths (one line
    instead of a line per tensor of the extra layers), or a class that prefixes every name (`bert.`)."""
    depths = {_label(recipe, inputs, c): _depth(c) for c in inputs.all}
    hint = None
    if len(set(depths.values())) > 1:
        least = min(depths.values())
        extra = [p for p in problems if (m := _LAYER.search(p.split(":", 1)[0])) and int(m.group(1)) >= least]
        said = ", ".join(f"{label} has {count} layers" for label, count in depths.items())
        problems = [f"the inputs have different depths: {said}", *(p for p in problems if p not in extra)]
        hint = "merge checkpoints of one architecture and size"
    names = [set(c.tensors) for c in inputs.all]
    for first, second in ((a, b) for a in range(len(names)) for b in range(len(names)) if a != b):
        prefixes = Counter(n.split(".", 1)[0] for n in names[first] if "." in n and n.split(".", 1)[1] in names[second])
        if prefixes and prefixes.most_common(1)[0][1] >= len(names[second]) // 2:
            prefix = prefixes.most_common(1)[0][0]
            labels = [_label(recipe, inputs, c) for c in (inputs.all[first], inputs.all[second])]
            hint = (f"{labels[0]} stores its tensors under `{prefix}.` and {labels[1]} without it: they were saved "
                    f"from different classes (a task model and its bare encoder, as BertForSequenceClassification "
                    f"and BertModel); merge checkpoints saved from the same class")
            break
    return problems, hint


def check_digests(recipe: Recipe, inputs: Inputs) -> None:
    """Refuse inputs that are not the checkpoints the recipe recorded (`digest`, written into every
    output's mergecli.toml)."""
    specs = ([("base", recipe.base, inputs.base)] if recipe.base else []) + [
        (model_label(i, spec), spec, ckpt) for i, (spec, ckpt) in enumerate(zip(recipe.models, inputs.models))]
    for label, spec, checkpoint in specs:
        if spec.digest and checkpoint.digest() != spec.digest:
            raise CheckpointError(checkpoint.source, f"{label}: its digest is {checkpoint.digest()[:19]}…, the recipe "
                                                     f"records {spec.digest[:19]}…; it is not the checkpoint "
                                                     "the recipe was written for",
                                  hint="point the recipe at that checkpoint, or remove its `digest` to accept this one")


def check_nothing_lost(inputs: Inputs, kept: list[TensorSpec], dropped: set[str]) -> None:
    """Refuse, before anything is written, an output that holds no tensors, or (when tensors were
    dropped as ones transformers does not load) one that lacks a weight transformers loads for the
    reference's class: it would load that output and fill the weight with random values, silently.

    Raises:
        CheckpointError: naming the reference and the weights the output would lack.
    """
    reference = inputs.reference
    if not kept:
        raise CheckpointError(reference.source, "the merge would write an output without tensors",
                              hint="check that the inputs hold the model's weights (and `exclude`)")
    if not dropped or reference.directory is None:
        return
    model = meta_model(reference.directory)
    if model is None:
        return
    try:
        names = stored_names(model, {spec.name: TensorInfo(spec.name, spec.dtype, spec.shape) for spec in kept})
    except StatsError:  # experts fused in a way only RegMean needs to follow: nothing to judge here
        return
    missing = [name for name, _ in model.named_parameters()
               if not any(candidate in names.tensors for candidate in candidate_names(name, names.prefixes))
               and names.fused_as(name) is None]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(reference.source, f"the output would lack weights that transformers loads for "
                                                f"{type(model).__name__} ({missing[0]!r}{more}), which would then "
                                                "hold random values: the inputs store them in a form mergecli "
                                                "does not read", hint="merge checkpoints of plain floating weights")
