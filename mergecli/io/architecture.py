"""What transformers loads for a checkpoint: the state-dict keys of the class its config names,
found by building that class on the meta device (free, whatever the model's size).

Tensors a checkpoint stores that the class does not load (buffers transformers no longer saves,
such as `embeddings.position_ids`, `rotary_emb.inv_freq` or GPT-2's `attn.bias`) can then be told
apart from real differences between checkpoints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device (buffers stay real): a model of any
    size is built in milliseconds, and its weights' random initialization costs nothing."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def model_class(config: object) -> type:
    """The transformers class a config's `architectures` names (else AutoModel)."""
    import transformers

    return next((getattr(transformers, name) for name in getattr(config, "architectures", None) or []
                 if hasattr(transformers, name)), transformers.AutoModel)


def meta_model(directory: Path) -> torch.nn.Module | None:
    """The class `directory/config.json` names, built on the meta device; None when there is no config
    or transformers cannot build the class."""
    import transformers

    if not (directory / "config.json").is_file():
        return None
    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        cls = model_class(config)
        with params_on_meta():
            return transformers.AutoModel.from_config(config) if cls is transformers.AutoModel \
                else cls._from_config(config)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, json.JSONDecodeError):
        return None


def loaded_keys(directory: Path) -> set[str] | None:
    """The state-dict keys (parameters and persistent buffers) of the class `directory/config.json`
    names; None when there is no config or transformers cannot build the class."""
    model = meta_model(directory)
    return None if model is None else set(model.state_dict())


def unloaded(names: set[str], expected: set[str]) -> set[str]:
    """The checkpoint tensors among `names` that a class loading `expected` keys ignores (a prefix
    such as `bert.` or `model.` may be added or dropped between checkpoint and class)."""
    suffixes = {key.split(".", 1)[1] for key in expected if "." in key}
    return {name for name in names
            if name not in expected and name not in suffixes
            and not any(key.endswith("." + name) for key in expected)}
