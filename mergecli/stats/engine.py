"""Running calibration data through a model one block at a time (the loop GPTQ-style quantizers use).

- `run_prefix`: the model's forward, with every block replaced by a catcher, runs the modules before
  the first block (their weights loaded as they are called) and records what each block receives.
- `run_block`: one block, its weights loaded, over every batch's hidden states.
- `run_tail`: the forward again, every block replaced by a replay of the last block's outputs, runs
  the modules after the last block, and stops once the layers it was asked for have run; `run_head`
  runs it to the end and hands on each batch's output (the logits `mergecli eval` scores).
Gram hooks (regmean/grams.py) can be attached to any of the three.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from mergecli.errors import StatsError
from mergecli.stats.calibration import Batch
from mergecli.stats.grams import GramCollector
from mergecli.stats.hidden import HiddenStates, MemoryBudget
from mergecli.stats.skeleton import Skeleton, first_line

Forward = Callable[..., Any]  # the model's forward (or e.g. CLIP's get_image_features)


class _Stop(Exception):
    """Raised inside a forward pass once everything needed from it has been seen."""


@dataclass
class Activations:
    """One model's calibration data on its way through the blocks.

    `hidden` holds, per batch, what enters block `block` next; `calls[b][i]` the other arguments
    block i is called with for batch b (attention mask, rotary embeddings, ...), recorded once.
    """

    batches: list[Batch]
    hidden: HiddenStates
    calls: list[list[tuple[tuple, dict]]]
    prefix_modules: set[str]
    tokens: int  # real tokens entering the blocks (padding excluded)
    block: int = 0
    extras: list[tuple] = field(default_factory=list)  # per batch: what a block returns besides the hidden states

    def close(self) -> None:
        self.hidden.close()


# block class → how many items a call returns, as probed (`_Probe`): 0 for the hidden states bare, else
# a tuple's length (more than 1: it hands on more than the hidden states)
_RETURNS: dict[type, int] = {}


def _returns_tensor(block: torch.nn.Module) -> bool:
    """Whether the block class returns a tensor (else a tuple whose first item is the hidden states):
    as probed on a real call (`_Probe`), else as its forward's annotation says."""
    items = _RETURNS.get(type(block))
    if items is not None:
        return items == 0
    return inspect.signature(type(block).forward).return_annotation in (torch.Tensor, "torch.Tensor")


class _Probe(torch.nn.Module):
    """Block 0 run for real once, to see what a block returns (GPT-NeoX's layers return a bare tensor
    and say nothing of it), then the pass stops."""

    def __init__(self, skeleton: Any, block: torch.nn.Module):
        super().__init__()
        self.skeleton, self.block = skeleton, block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.skeleton.load([self.block])
        try:
            out = self.block(*args, **kwargs)
        finally:
            self.skeleton.release([self.block])
        _RETURNS[type(self.block)] = 0 if isinstance(out, torch.Tensor) else len(out) if isinstance(out, tuple) else 1
        raise _Stop


class _Catcher(torch.nn.Module):
    """Stands in for block `index` in the prefix pass: records its arguments, passes the hidden states
    on. Where a block returns more than its hidden states (T5's position bias, computed by block 0 and
    handed to every later block), block 0 runs for real (`real`) and the others return its extras."""

    def __init__(self, index: int, last: bool, record: Callable[[int, tuple, dict], None], tensor: bool,
                 real: torch.nn.Module | None = None, extras: list | None = None):
        super().__init__()
        self.index, self.last, self.record, self.tensor = index, last, record, tensor
        self.real, self.extras = real, extras

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.record(self.index, args, kwargs)
        if self.last:
            raise _Stop
        if self.tensor:
            return args[0]
        if self.extras is None:
            return (args[0],)
        if self.real is not None:
            self.extras.append(tuple(self.real(*args, **kwargs)[1:]))
        return (args[0], *self.extras[-1])


class _Replay(torch.nn.Module):
    def __init__(self, tensor: bool):
        super().__init__()
        self.tensor = tensor
        self.output: torch.Tensor | None = None
        self.extras: tuple = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output if self.tensor else (self.output, *self.extras)


@contextmanager
def _blocks_replaced(skeleton: Skeleton, make: Callable[[int], torch.nn.Module]) -> Iterator[None]:
    original = list(skeleton.blocks)
    for index in range(len(original)):
        skeleton.blocks[index] = make(index)
    try:
        yield
    finally:
        for index, block in enumerate(original):
            skeleton.blocks[index] = block


@contextmanager
def _loaded_on_call(skeleton: Skeleton, ran: set[str]) -> Iterator[None]:
    """Load each module outside the blocks when it is first called (recording its name), and free
    them all afterwards: only what the pass really runs is ever read. A `MultiheadAttention` (SigLIP's
    pooling head) reads its `out_proj` weight without calling it: it is loaded with its submodules."""
    inside = {id(m) for m in skeleton.blocks.modules()}
    outside = [(name, m) for name, m in skeleton.model.named_modules() if id(m) not in inside]
    loaded: list[tuple[torch.nn.Module, bool]] = []

    def hook_for(name: str) -> Callable:
        def load(module: torch.nn.Module, args: tuple) -> None:
            if name not in ran:
                ran.add(name)
                whole = isinstance(module, torch.nn.MultiheadAttention)
                skeleton.load([module], recurse=whole)
                loaded.append((module, whole))
        return load

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in outside]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for whole in (False, True):
            skeleton.release([module for module, recursed in loaded if recursed == whole], recurse=whole)


def _forward_error(label: str, exc: BaseException) -> StatsError:
    memory = "out of memory" in str(exc).lower()
    return StatsError(f"{label}: the forward pass failed: {first_line(exc)}",
                      hint="lower regmean.batch_size or max_length" if memory else None)


def _run(skeleton: Skeleton, forward: Forward, batch: Batch) -> None:
    """The model's forward on one batch, until a catcher or a hook stops it."""
    try:
        forward(**batch.inputs)
    except _Stop:
        pass
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise _forward_error(skeleton.label, exc) from None


def run_prefix(skeleton: Skeleton, batches: list[Batch], forward: Forward, budget: MemoryBudget, name: str, *,
               collector: GramCollector | None = None) -> Activations:
    """Run the modules before the first block on every batch and capture the first block's inputs."""
    count = len(skeleton.blocks)
    first = skeleton.blocks[0]
    if type(first) not in _RETURNS and batches:  # what a block returns, from one real call
        with _blocks_replaced(skeleton, lambda i: _Probe(skeleton, first) if i == 0 else skeleton.blocks[i]), \
                _loaded_on_call(skeleton, set()), torch.inference_mode():
            _run(skeleton, forward, batches[0])
    tensor = _returns_tensor(first)
    extras: list | None = [] if _RETURNS.get(type(first), 1) > 1 else None
    hidden = HiddenStates(budget, f"{name}-prefix")
    calls: list[list[tuple[tuple, dict]]] = []
    ran: set[str] = set()
    tokens = 0

    def record(index: int, args: tuple, kwargs: dict) -> None:
        nonlocal tokens
        if index == 0:
            batch = batches[len(calls) - 1]
            hidden.put(len(calls) - 1, args[0])
            tokens += int(batch.mask.sum()) if batch.mask is not None else args[0].shape[:-1].numel()
        calls[-1].append((args[1:], kwargs))

    if extras is not None:
        skeleton.load([first])
    try:
        with _blocks_replaced(skeleton, lambda i: _Catcher(i, i == count - 1, record, tensor,
                                                           first if i == 0 else None, extras)), \
                _loaded_on_call(skeleton, ran), torch.inference_mode():
            for batch in batches:
                calls.append([])
                if collector is not None:
                    collector.begin_batch(batch.mask)
                _run(skeleton, forward, batch)
                if len(calls[-1]) != count:
                    raise StatsError(f"{skeleton.label}: the model did not run its {count} blocks in order")
    finally:
        if extras is not None:
            skeleton.release([first])
    return Activations(batches, hidden, calls, ran, tokens, extras=extras or [])


def run_block(skeleton: Skeleton, index: int, acts: Activations, *, collector: GramCollector | None = None,
              keep: bool = True, name: str = "") -> HiddenStates | None:
    """Run block `index` of `skeleton` (its weights loaded for the call, then freed) over `acts`'
    hidden states; return its outputs (`keep`) in a store drawing on the same budget."""
    block = skeleton.blocks[index]
    outputs = HiddenStates(acts.hidden.budget, f"{name or skeleton.label}-{index}") if keep else None
    held = skeleton.holds(block)  # loaded by the caller for several runs (`Skeleton.held`): left loaded
    if not held:
        skeleton.load([block])
    try:
        with torch.inference_mode():
            for number, batch in enumerate(acts.batches):
                args, kwargs = acts.calls[number][index]
                if collector is not None:
                    collector.begin_batch(batch.mask)
                try:
                    out = block(acts.hidden.get(number), *args, **kwargs)
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    raise _forward_error(skeleton.label, exc) from None
                if outputs is not None:
                    outputs.put(number, out[0] if isinstance(out, tuple) else out)
    finally:
        if not held:
            skeleton.release([block])
    return outputs


def advance(acts: Activations, outputs: HiddenStates) -> None:
    """Make `outputs` (of block `acts.block`) the hidden states entering the next block."""
    acts.hidden.close()
    acts.hidden = outputs
    acts.block += 1


def run_tail(skeleton: Skeleton, acts: Activations, forward: Forward, *, collector: GramCollector,
             stop_after: set[str]) -> None:
    """Run the modules after the last block on `acts`' final hidden states (the forward pass, its
    blocks replaying those states); each batch stops once every layer of `stop_after` has run."""
    replay = _Replay(_returns_tensor(skeleton.blocks[0]))

    def stop(module: torch.nn.Module, args: tuple) -> None:
        if stop_after <= collector.fired:
            raise _Stop

    modules = dict(skeleton.model.named_modules())
    handles = [modules[name].register_forward_pre_hook(stop) for name in stop_after]
    try:
        with _blocks_replaced(skeleton, lambda i: replay), _loaded_on_call(skeleton, set()), torch.inference_mode():
            for number, batch in enumerate(acts.batches):
                replay.output = acts.hidden.get(number)
                replay.extras = acts.extras[number] if acts.extras else ()
                collector.begin_batch(batch.mask)
                _run(skeleton, forward, batch)
    finally:
        for handle in handles:
            handle.remove()


def run_head(skeleton: Skeleton, acts: Activations, forward: Forward) -> Iterator[tuple[Batch, Any]]:
    """The modules after the last block on `acts`' final hidden states, each batch's whole output (logits):
    the forward pass again, its blocks replaying those states (`mergecli eval`)."""
    replay = _Replay(_returns_tensor(skeleton.blocks[0]))
    with _blocks_replaced(skeleton, lambda i: replay), _loaded_on_call(skeleton, set()), torch.inference_mode():
        for number, batch in enumerate(acts.batches):
            replay.output = acts.hidden.get(number)
            replay.extras = acts.extras[number] if acts.extras else ()
            try:
                output = forward(**batch.inputs)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise _forward_error(skeleton.label, exc) from None
            yield batch, output
