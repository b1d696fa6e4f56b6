"""Writing an adapter: `mergecli extract-lora` (a model against its base), one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mergecli.errors import CheckpointError
from mergecli.io.atomic import atomic_directory, check_output_path
from mergecli.io.checkpoint import open_checkpoint
from mergecli.merge.lora_extract import AdapterWriter
from mergecli.recipe.load import resolve_local


def base_name(path: str) -> str:
    """What an adapter names its base: a hub repo id as it is; a local path by its folder's name only."""
    return path if not os.path.exists(path) else Path(path).resolve().name


def card(base: str, writer: AdapterWriter, *, what: str) -> str:
    return (f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- mergecli\n- lora\n---\n\n"
            f"# LoRA adapter of {base}\n\n{what} by mergecli as a truncated SVD of each "
            "matrix's difference from the base.\n\n" + writer.summary())


def extract(model_path: str, base_path: str, output: Path, *, rank: int | None, error: float | None,
            force: bool = False) -> dict[str, Any]:
    model_path, base_path = resolve_local(model_path, Path.cwd()), resolve_local(base_path, Path.cwd())
    with open_checkpoint(model_path) as model, open_checkpoint(base_path) as base:
        for name, info in model.tensors.items():
            other = base.tensors.get(name)
            if other is None or tuple(other.shape) != tuple(info.shape):
                where = "it has not" if other is None else f"it is {list(other.shape)} there"
                raise CheckpointError(model_path, f"tensor {name!r} {list(info.shape)} is not its base's ({where})",
                                      hint="give the model it was fine-tuned from as --base")
        inputs = [Path(p) for p in (model_path, base_path) if os.path.exists(p)]
        check_output_path(output, inputs, force=force)
        writer = AdapterWriter(base, rank=rank, error=error, base_name=base_name(base_path))
        for name, info in model.tensors.items():
            if info.dtype.is_floating_point:
                writer.add(name, model.read(name))
            elif not model.read(name).equal(base.read(name)):
                raise CheckpointError(model_path, f"integer tensor {name!r} differs from its base's",
                                      hint="an adapter holds floating tensors only")
        with atomic_directory(output, force=force) as directory:
            writer.write(directory)
            (directory / "README.md").write_text(card(writer.base_name, writer, what="Extracted from a fine-tune"))
    worst = max(writer.errors.values(), default=0.0)
    return {"output": str(output), "tensors": len(writer.errors) + len(writer.saved), "factored": len(writer.errors),
            "worst_error": worst, "errors": writer.errors, "ranks": writer.ranks}
