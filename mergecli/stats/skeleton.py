"""A transformers model built without weights: its parameters live on the meta device, its buffers
are real, and the weights of one module at a time are read from a checkpoint and freed again.

This is how RegMean runs a model larger than memory: the blocks (the model's list of repeated
layers) are found generically, and only one of them holds weights at any time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import StatsError
from mergecli.io.architecture import model_class, params_on_meta, quiet_transformers
from mergecli.io.checkpoint import Checkpoint
from mergecli.stats.experts import FusedParameter, load_fused
from mergecli.stats.layers import LinearLayer, stored_names


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def find_blocks(model: torch.nn.Module, *, images: bool = False) -> tuple[str, torch.nn.ModuleList]:
    """The model's list of repeated layers (`model.layers`, `transformer.h`, `encoder.layer`, ...):
    the longest `ModuleList` whose members are all of one class; in a dual encoder (CLIP), the
    image tower's for image data and the other one's for text."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module)
             and len({type(m) for m in module}) == 1]
    if not found:
        raise StatsError(f"{type(model).__name__} has no list of repeated layers (transformer blocks)")
    return max(found, key=lambda item: (("vision" in item[0]) == images, len(item[1])))


@dataclass
class Skeleton:
    """A weightless model and where each of its parameters is stored in `checkpoint`.

    A parameter shared by several modules (tied embeddings) is loaded once and set everywhere.
    """

    model: torch.nn.Module
    checkpoint: Checkpoint
    dtype: torch.dtype
    device: str
    label: str
    images: bool = False  # calibrated on images: a dual encoder's image tower holds the blocks
    blocks_path: str = ""
    blocks: torch.nn.ModuleList = field(default_factory=torch.nn.ModuleList)
    # parameter name → where it is set: (module, attribute, is a buffer)
    _places: dict[str, list[tuple[torch.nn.Module, str, bool]]] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)  # parameter name → checkpoint tensor
    fused: dict[str, FusedParameter] = field(default_factory=dict)  # parameter name → its stored parts (MoE)

    def __post_init__(self) -> None:
        try:
            self.blocks_path, self.blocks = find_blocks(self.model, images=self.images)
        except StatsError as exc:
            raise StatsError(f"{self.label}: {exc.message}") from None
        names = stored_names(self.model, self.checkpoint.tensors)
        canonical: dict[int, str] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            owned = [(attr, p, False) for attr, p in module._parameters.items() if p is not None]
            owned += [(attr, b, True) for attr, b in module._buffers.items()
                      if b is not None and attr not in module._non_persistent_buffers_set]
            for attr, tensor, is_buffer in owned:
                full = f"{module_name}.{attr}" if module_name else attr
                key = canonical.setdefault(id(tensor), full)
                self._places.setdefault(key, []).append((module, attr, is_buffer))
                stored = names.stored(full, tuple(tensor.shape))
                if stored and key not in self.stored:
                    self.stored[key] = stored
                elif full in names.fused:
                    self.fused[key] = names.fused[full]
        missing = [key for key, places in self._places.items()
                   if key not in self.stored and key not in self.fused and not places[0][2]]
        if missing:
            raise StatsError(f"{self.label}: the checkpoint has no weight for {missing[0]}"
                             f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}",
                             hint="the checkpoint does not match its config.json")

    def _keys(self, modules: Iterable[torch.nn.Module], *, recurse: bool) -> list[str]:
        wanted = {id(m) for root in modules for m in (root.modules() if recurse else [root])}
        return [key for key, places in self._places.items() if any(id(m) in wanted for m, _, _ in places)]

    def load(self, modules: Iterable[torch.nn.Module], *, recurse: bool = True) -> None:
        """Read the weights of `modules` (and their submodules) into them, in the compute dtype; with
        `--stream`, every read of the call is announced first, so that they are fetched side by side."""
        wanted = []
        for key in self._keys(modules, recurse=recurse):
            module, attr, is_buffer = self._places[key][0]
            current = module._buffers[attr] if is_buffer else module._parameters[attr]
            if current is not None and current.device.type != "meta" and not is_buffer:
                continue  # already loaded
            if key in self.stored or key in self.fused:  # else a buffer the checkpoint does not store
                wanted.append(key)
        if self.checkpoint.fetcher is not None:
            reads = [read for key in wanted for name in self.stored_as(key)
                     for read in self.checkpoint.remote_reads(name, None)]
            self.checkpoint.fetcher.schedule(reads)
        for key in wanted:
            places = self._places[key]
            is_buffer = places[0][2]
            tensor = load_fused(self.fused[key], self.checkpoint.read) if key in self.fused \
                else self.checkpoint.read(self.stored[key])
            if tensor.is_floating_point():
                tensor = tensor.to(device=self.device, dtype=self.dtype)
            else:
                tensor = tensor.to(self.device)
            value = tensor if is_buffer else torch.nn.Parameter(tensor, requires_grad=False)
            for module, attr, _ in places:
                (module._buffers if is_buffer else module._parameters)[attr] = value

    @contextmanager
    def held(self, modules: list[torch.nn.Module]) -> Iterator[None]:
        """`modules` loaded for the whole `with`: the runs inside it (a MoE block's rounds) read their
        weights once, and do not free them."""
        self.load(modules)
        try:
            yield
        finally:
            self.release(modules)

    def holds(self, module: torch.nn.Module) -> bool:
        """Whether `module`'s weights are loaded."""
        return all(p.device.type != "meta" for p in module.parameters())

    def stored_as(self, key: str) -> list[str]:
        """The checkpoint tensors parameter `key` is read from (several for a fused one)."""
        return self.fused[key].stored if key in self.fused else [self.stored[key]] if key in self.stored else []

    def release(self, modules: Iterable[torch.nn.Module], *, recurse: bool = True) -> None:
        """Drop the weights of `modules` (back to the meta device)."""
        for key in self._keys(modules, recurse=recurse):
            places = self._places[key]
            module, attr, is_buffer = places[0]
            if is_buffer:
                continue
            current = module._parameters[attr]
            if current is None or current.device.type == "meta":
                continue
            empty = torch.nn.Parameter(torch.empty_like(current, device="meta"), requires_grad=False)
            for module, attr, _ in places:
                module._parameters[attr] = empty


def compute_dtype(checkpoint: Checkpoint, device: str) -> torch.dtype:
    """The dtype to run a model in: on CPU float32 (half precision is slow there), or float64 for a
    float64 checkpoint; on GPU the checkpoint's own dtype."""
    dtypes = [t.dtype for t in checkpoint.tensors.values() if t.dtype.is_floating_point]
    stored = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    if device.startswith("cpu"):
        return torch.float64 if stored == torch.float64 else torch.float32
    return stored


def build_skeleton(directory: Path, checkpoint: Checkpoint, *, device: str, label: str,
                   dtype: torch.dtype | None = None, images: bool = False) -> Skeleton:
    """The model of `directory/config.json` (the class its `architectures` names, else AutoModel),
    without weights, set up to read them from `checkpoint` block by block.

    Raises:
        StatsError: transformers cannot read the config or build the model, or the checkpoint
            does not hold the model's weights, or it has no list of repeated layers.
    """
    import transformers

    quiet_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError, RecursionError) as exc:
        raise StatsError(f"{label}: transformers cannot read {directory / 'config.json'}: {first_line(exc)}",
                         hint="RegMean statistics need a model that transformers can load") from None
    if hasattr(config, "use_cache"):
        config.use_cache = False
    cls = model_class(config)
    dtype = dtype or compute_dtype(checkpoint, device)
    if dtype == torch.float64 and hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # MoE experts: the grouped matmul has no float64 kernel
    try:
        with params_on_meta():
            if cls is transformers.AutoModel:
                model = transformers.AutoModel.from_config(config, dtype=dtype)
            else:
                model = cls._from_config(config, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as exc:
        raise StatsError(f"{label}: transformers cannot build the model of {directory}: {first_line(exc)}") from None
    model.eval()
    for module in model.modules():  # buffers (rotary frequencies, position ids) where the model runs
        for attr, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[attr] = buffer.to(device)
    return Skeleton(model, checkpoint, dtype, device, label, images)


def max_positions(model: torch.nn.Module) -> int | None:
    """How many tokens the model's position embeddings allow (None: no limit)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def forward_of(model: torch.nn.Module, kind: str) -> Any:
    """What runs the model on a batch: a dual encoder (CLIP) given images runs its image tower only."""
    if kind == "image" and hasattr(model, "get_image_features"):
        return model.get_image_features
    return model


def stage_layers(skeleton: Skeleton, layers: list[LinearLayer]) -> tuple[list[LinearLayer], list[list[LinearLayer]]]:
    """The layers outside the blocks, and those of each block."""
    prefix = skeleton.blocks_path + "."
    blocks: list[list[LinearLayer]] = [[] for _ in skeleton.blocks]
    outside = []
    for layer in layers:
        if layer.module.startswith(prefix):
            blocks[int(layer.module[len(prefix):].split(".", 1)[0])].append(layer)
        else:
            outside.append(layer)
    return outside, blocks


def hooked(skeleton: Skeleton, layers: list[LinearLayer]) -> dict[str, torch.nn.Module]:
    """The modules of `layers`, by their path: what a Gram collector hooks (for an expert's projection,
    its experts module)."""
    modules = dict(skeleton.model.named_modules())
    return {layer.hooked: modules[layer.hooked] for layer in layers}
