"""RegMean++ (Nguyen et al., arXiv 2508.03121, TMLR 2026): block l's Grams come from each model's
own block l run on inputs that went through the *merged* blocks 0..l-1.

The merge runs in stages (methods/base.py `Stage`), one after another:
- prefix: everything outside the blocks but the linear layers after them is merged (averaged; a
  linear layer before the first block is solved from each model's own prefix); then every model's
  calibration data runs through the merged prefix, read back from the output being written;
- block l: each model's own block l runs on those hidden states with Gram hooks (the Grams go to a
  scratch store under stats_dir), block l is solved and written, and the merged block l turns the
  hidden states into those of block l + 1;
- tail: the linear layers after the last block (LM head, pooler, classifier), from each model's own
  modules run on the merged hidden states.
Memory: one block's weights at a time, the models' hidden states (spilled past the budget), and
one model's block Grams while they are collected; it does not grow with depth.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from mergecli.errors import shown
from mergecli.io.atomic import scratch_directory
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.memory import give_back_memory
from mergecli.methods.base import FLOPS_PER_BYTE, Combine, Inputs, Stage, TensorTask
from mergecli.methods.regmean.solve import regmean_task
from mergecli.methods.regmean.tasks import EXPERT_AVERAGE, few_tokens_warning
from mergecli.recipe import Recipe, model_label
from mergecli.stats.calibration import Batch, model_batches, read_examples
from mergecli.stats.device import resolve_device
from mergecli.stats.engine import Activations, Forward, advance, run_block, run_prefix, run_tail
from mergecli.stats.grams import GramCollector, expert_keys, gram_rounds
from mergecli.stats.hidden import MemoryBudget
from mergecli.stats.layers import LinearLayer, find_linear_layers
from mergecli.stats.skeleton import (
    Skeleton,
    build_skeleton,
    compute_dtype,
    forward_of,
    hooked,
    max_positions,
    stage_layers,
)
from mergecli.stats.store import ModelStats, StatsFiles, load_stats, stats_meta


@dataclass
class _Candidate:
    """One model to merge: its skeleton, its calibration batches, and their current hidden states."""

    skeleton: Skeleton
    batches: list[Batch]
    kind: str  # of its calibration data: "text" or "image"
    acts: Activations | None = None

    @property
    def forward(self) -> Forward:
        return forward_of(self.skeleton.model, self.kind)


@dataclass
class SequentialMerge:
    """What RegMean++'s stages share while a merge runs."""

    recipe: Recipe
    inputs: Inputs
    device: str = "cpu"
    candidates: list[_Candidate] = field(default_factory=list)
    grams: list[ModelStats] = field(default_factory=list)  # the current stage's, per model
    merged: Skeleton | None = None
    budget: MemoryBudget | None = None
    scratch: Path = Path()
    created_stats_dir: bool = False  # stats_dir was made for the scratch files: remove it at the end

    def start(self) -> None:
        """Build every model without weights and prepare its calibration batches."""
        settings = self.recipe.settings
        self.created_stats_dir = not Path(settings.stats_dir).exists()
        self.scratch = scratch_directory(Path(settings.stats_dir), "plusplus")
        self.budget = MemoryBudget(settings.memory_budget, scratch_directory(Path(settings.stats_dir), "spill"))
        dtype = compute_dtype(self.inputs.models[0], self.device)
        for index, (spec, checkpoint) in enumerate(zip(self.recipe.models, self.inputs.models)):
            label = model_label(index, spec)
            data = read_examples(spec.data, num_examples=settings.num_examples, text_field=settings.text_field,
                                 label=f"{label}.data")
            skeleton = build_skeleton(checkpoint.directory, checkpoint, device=self.device, label=label, dtype=dtype,
                                      images=data.kind == "image")
            batches, _ = model_batches(data, checkpoint.directory, batch_size=settings.batch_size,
                                       max_length=settings.max_length, max_positions=max_positions(skeleton.model),
                                       label=label)
            self.candidates.append(_Candidate(skeleton, [b.to(self.device, dtype) for b in batches], data.kind))

    def collect(self, layers: list[LinearLayer], run: Callable[[_Candidate, GramCollector], object],
                block: int | None = None) -> None:
        """Each model's Grams of `layers` (all of one stage, of `block` if a block's), by `run` (once per
        round of a MoE block's experts that fit the memory budget, the block's weights read once);
        written to the scratch store one model at a time, and opened for the solve."""
        self.drop_grams()
        rounds = gram_rounds(layers, self.budget.limit)
        for index, candidate in enumerate(self.candidates):
            held = [candidate.skeleton.blocks[block]] if block is not None and len(rounds) > 1 else []
            with candidate.skeleton.held(held):
                self._collect_rounds(index, candidate, rounds, run)

    def _collect_rounds(self, index: int, candidate: _Candidate, rounds: list[list[LinearLayer]],
                        run: Callable[[_Candidate, GramCollector], object]) -> None:
        """One model's Grams of `rounds`, each summed by a run of its own, into its scratch statistics."""
        directory = self.scratch / f"m{index}"
        directory.mkdir(parents=True, exist_ok=True)
        files = StatsFiles(directory, fingerprint="", model=f"m{index}")
        ran: list[LinearLayer] = []
        gram_of: dict[str, str] = {}
        tokens: dict[str, int] = {}
        for round_layers in rounds:
            with GramCollector(hooked(candidate.skeleton, round_layers),
                               experts=expert_keys(round_layers)) as collector:
                run(candidate, collector)
            summed = {key: gram.tokens for key, gram in collector.sums.items()}
            files.add({key: gram.done() for key, gram in collector.sums.items()}, summed)
            ran += collector.layers(round_layers)
            gram_of.update(collector.gram_of)
            tokens.update(summed)
            give_back_memory()
        files.finish(stats_meta(model=f"m{index}", source="", revision=None, fingerprint="", weights_sha256="",
                                data={}, examples=0, tokens=0, layers=ran, gram_of=gram_of, gram_tokens=tokens))
        self.grams.append(load_stats(directory))

    def gram(self, index: int, weight: str) -> tuple[torch.Tensor, int]:
        """Model `index`'s Gram of the layer whose weight is `weight`, and its token count."""
        layer = self.grams[index].layers[weight]
        return self.grams[index].read_gram(layer.gram), layer.tokens

    def merged_model(self, output: Checkpoint) -> Skeleton:
        """The merged model, reading its weights from the output as far as it is written."""
        if self.merged is None:
            first = self.candidates[0].skeleton
            self.merged = build_skeleton(self.inputs.reference.directory, output, device=self.device,
                                         label="the merged model", dtype=first.dtype, images=first.images)
        return self.merged

    def drop_grams(self) -> None:
        self.grams = []
        shutil.rmtree(self.scratch, ignore_errors=True)

    def close(self) -> None:
        self.drop_grams()
        for candidate in self.candidates:
            if candidate.acts is not None:
                candidate.acts.close()
        self.candidates.clear()
        if self.merged is not None:
            self.merged.checkpoint.close()
        if self.budget is not None:
            self.budget.close()
        if self.created_stats_dir:
            with contextlib.suppress(OSError):  # only if empty
                self.scratch.parent.rmdir()


def plusplus_stages(recipe: Recipe, inputs: Inputs, tasks: list[TensorTask], warnings: list[str]) -> list[Stage]:
    """RegMean++'s stages: the prefix, each block, the tail (see the module's docstring).

    Reads every model's calibration data and builds one model without weights; runs nothing.
    """
    for index, spec in enumerate(recipe.models):  # bad data fails at planning, not halfway through
        read_examples(spec.data, num_examples=recipe.settings.num_examples, text_field=recipe.settings.text_field,
                      label=f"{model_label(index, spec)}.data")
    reference = inputs.models[0]
    skeleton = build_skeleton(reference.directory, reference, device="cpu", label=model_label(0, recipe.models[0]))
    layers, _ = find_linear_layers(skeleton.model, reference.tensors)
    outside, per_block = stage_layers(skeleton, layers)
    order = list(dict(skeleton.model.named_modules()))
    tail = [layer for layer in outside if order.index(layer.module) > order.index(skeleton.blocks_path)]
    prefix = [layer for layer in outside if layer not in tail]
    state = SequentialMerge(recipe, inputs, device=resolve_device(inputs.device))

    by_name = {task.out.name: task for task in tasks}
    decided: dict[str, tuple[str, str]] = {}  # shared by the stages: what the solves chose as they ran
    linear = {layer.weight: layer for layer in layers if by_name.get(layer.weight, None) is not None
              and by_name[layer.weight].kind == "average"}  # excluded / head weights stay as they are

    def tasks_of(names: list[str]) -> list[TensorTask]:
        out = []
        for name in names:
            layer = linear.get(name)
            if layer is None:
                out.append(by_name[name])
                continue
            sources = [lambda i=i, name=name: state.gram(i, name) for i in range(len(inputs.models))]
            task = regmean_task(by_name[name], sources, recipe, warnings, models=tuple(inputs.models),
                                orientation=layer.orientation, in_features=layer.in_features, kind="regmean++")
            out.append(replace(task, combine=solved_or_averaged(name, task.combine, by_name[name].combine)))
        return out

    def solved_or_averaged(name: str, solve: Combine, average: Combine) -> Combine:
        """A layer whose module never ran in its stage (SigLIP's pooling head reads `out_proj.weight`
        without calling it) has no Grams, and an expert may see fewer tokens than it has inputs:
        each is averaged, and the merge says so."""
        def combine(blocks: list[torch.Tensor], merged: torch.Tensor) -> torch.Tensor:
            layers = [grams.layers.get(name) for grams in state.grams]
            if any(layer is None for layer in layers):
                note = f"regmean++: {shown(name)}: its layer never ran on the calibration data; it is averaged"
            elif any(layer.underdetermined for layer in layers):
                tokens = "/".join(str(layer.tokens) for layer in layers)
                decided[name] = (EXPERT_AVERAGE, f"{name} ({tokens} tokens, {layers[0].in_features} inputs)")
                return average(blocks, merged)
            else:
                return solve(blocks, merged)
            if note not in warnings:
                warnings.append(note)
            return average(blocks, merged)
        return combine

    block_of = _block_of_tensors(skeleton)
    tail_names = {layer.weight for layer in tail}

    def before_prefix() -> None:
        state.start()
        if prefix:
            state.collect(prefix, lambda c, collector: run_prefix(c.skeleton, c.batches, c.forward, state.budget,
                                                                  "own-prefix", collector=collector).close())

    def after_prefix(output: Checkpoint) -> None:
        merged = state.merged_model(output)
        for index, candidate in enumerate(state.candidates):
            candidate.acts = run_prefix(merged, candidate.batches, forward_of(merged.model, candidate.kind),
                                        state.budget, f"m{index}")

    settings = recipe.settings
    tokens = len(recipe.models) * settings.num_examples * settings.max_length / 2  # a guess: half-full examples

    def forward_cost(stage_tasks: list[TensorTask], layers: list[LinearLayer]) -> float:
        """Each model's own modules and the merged ones run over its tokens, with Gram products."""
        flops = 2 * sum(task.out.numel for task in stage_tasks) + sum(layer.in_features ** 2 for layer in layers)
        return 2 * tokens * flops / FLOPS_PER_BYTE

    first = tasks_of([n for n in by_name if n not in block_of and n not in tail_names])
    stages = [Stage(first, before_prefix, after_prefix, label="prefix", hook_cost=forward_cost(first, prefix),
                    decided=decided)]
    for index, block_layers in enumerate(per_block):
        block = tasks_of([n for n in by_name if block_of.get(n) == index])
        stages.append(Stage(block, *_block_hooks(state, index, block_layers),
                            label=f"block {index + 1}/{len(per_block)}", hook_cost=forward_cost(block, block_layers),
                            decided=decided))
    collect_tail = (lambda: state.collect(tail, lambda c, collector: run_tail(
        c.skeleton, c.acts, c.forward, collector=collector, stop_after={t.module for t in tail}))) if tail else None
    last = tasks_of([n for n in by_name if n in tail_names])
    def finish() -> None:
        """Free what the stages shared; one warning names every expert weight they averaged."""
        state.close()
        few = [note for kind, note in decided.values() if kind == EXPERT_AVERAGE]
        if few:
            warnings.append(few_tokens_warning("regmean++", few))

    stages.append(Stage(last, collect_tail, cleanup=finish, label="tail", hook_cost=forward_cost(last, tail) / 2,
                        decided=decided))
    return stages


def _block_hooks(state: SequentialMerge, index: int,
                 layers: list[LinearLayer]) -> tuple[Callable[[], None], Callable[[Checkpoint], None]]:
    def before() -> None:
        state.collect(layers, lambda c, collector: run_block(c.skeleton, index, c.acts, collector=collector,
                                                             keep=False), block=index)

    def after(output: Checkpoint) -> None:
        merged = state.merged_model(output)
        for number, candidate in enumerate(state.candidates):
            advance(candidate.acts, run_block(merged, index, candidate.acts, name=f"m{number}"))
        give_back_memory()

    return before, after


def _block_of_tensors(skeleton: Skeleton) -> dict[str, int]:
    """Checkpoint tensor name → the block it belongs to."""
    prefix = skeleton.blocks_path + "."
    keys = [key for key in [*skeleton.stored, *skeleton.fused] if key.startswith(prefix)]
    return {stored: int(key[len(prefix):].split(".", 1)[0]) for key in keys for stored in skeleton.stored_as(key)}
