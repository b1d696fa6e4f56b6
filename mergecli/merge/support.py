"""Support files of an output: config.json (with the output dtype), tokenizer and processor files,
the model card, and mergecli.toml, the recipe as run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mergecli.io.files import TOKENIZER_FILES
from mergecli.merge.plan import MergePlan
from mergecli.methods.base import Inputs
from mergecli.publish.card import render_card
from mergecli.recipe import Recipe, dump_recipe


def _config_dtype(plan: MergePlan) -> str:
    dtypes = [t.out.dtype for t in plan.tasks if t.out.dtype.is_floating_point]
    common = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    return str(common).removeprefix("torch.")


def _first_with(inputs: Inputs, filename: str) -> Path | None:
    for checkpoint in [inputs.reference, *inputs.models]:
        if checkpoint.directory and (checkpoint.directory / filename).is_file():
            return checkpoint.directory
    return None


def resolved_recipe(plan: MergePlan) -> Recipe:
    """The recipe as run: absolute output, hub revisions pinned to the resolved commits."""
    recipe = plan.recipe
    models = [
        spec.model_copy(update={"revision": ckpt.commit}) if ckpt.commit else spec
        for spec, ckpt in zip(recipe.models, plan.inputs.models)
    ]
    update: dict = {"models": models, "output": str(plan.output)}
    if recipe.base and plan.inputs.base and plan.inputs.base.commit:
        update["base"] = recipe.base.model_copy(update={"revision": plan.inputs.base.commit})
    return recipe.model_copy(update=update)


def write_support_files(plan: MergePlan, directory: Path) -> None:
    """config.json (with the output dtype), tokenizer files, the model card, mergecli.toml."""
    source = _first_with(plan.inputs, "config.json")
    config = None
    if source:
        config = json.loads((source / "config.json").read_text())
        dtype = _config_dtype(plan)
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            config[key] = dtype
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if plan.recipe.copy_tokenizer:
        tokenizer_dir = _first_with(plan.inputs, "tokenizer_config.json") or _first_with(
            plan.inputs, "preprocessor_config.json")
        if tokenizer_dir is None:
            if source:  # a transformers checkpoint without a tokenizer is worth a word
                plan.warnings.append("copy_tokenizer: no input has tokenizer files; none copied")
        else:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copyfile(tokenizer_dir / name, directory / name)
    recipe = resolved_recipe(plan)
    (directory / "mergecli.toml").write_text(dump_recipe(recipe))
    (directory / "README.md").write_text(render_card(recipe, plan.method, config=config))
