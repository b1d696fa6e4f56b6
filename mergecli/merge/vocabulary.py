"""Vocabularies united by token string (`tokenizer = "base" | "union" | "<model name>"`).

The output's vocabulary is the reference's (`base`: the base model, else the first model), a named
model's, or the union: the reference's tokens, then the tokens the models added, in recipe order.
Every embedding and output-head row is matched by the token it stands for, read from each input's
`tokenizer.json`, never by its number. A row an input lacks is filled in: a model's from the base's
row of that token (a zero task vector), else, and for the base, by the weighted mean of the models
that have it (they share its weight). Padding rows past the tokens (`pad_to_multiple_of`) are
matched by position; one no input has is the mean of each input's token rows, as mergekit fills it.

The inputs are then seen through `VocabularyView`s: each presents the output's row count, and reads
a block of rows by gathering the input's own rows (contiguous runs, one read each) and filling the
missing ones, so every method streams these tensors by row blocks as any other.

Vocabularies that differ beyond added tokens (Llama 2 against Llama 3) cannot be united: refused
before anything is read.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergecli.errors import CheckpointError
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.files import regular_file
from mergecli.io.safetensors import TensorInfo
from mergecli.io.tokens import TOKENIZER_FILE, read_tokens
from mergecli.merge.token_table import ExternalTokenizer, Source, external_tokenizer, token_sources
from mergecli.methods.base import Inputs
from mergecli.recipe import Recipe

MEAN_BLOCK_ROWS = 4096  # rows summed per step of a padding row's mean


@dataclass
class Vocabulary:
    """The output's vocabulary, and where each input has each of its rows."""

    tokens: list[str]  # output row → token; rows past them are padding
    rows: int
    source: str  # the input whose tokenizer files are written ("base" or its name; `added` appended for a union)
    added: list[tuple[str, bool]]  # (token, special) appended to the source's tokenizer
    maps: list[torch.Tensor]  # per input (Inputs.all order): output row → its row, or -1
    tensors: set[str]  # the tensors whose rows are the vocabulary
    weights: Callable[[str], list[float]]  # per tensor, per input: its share of a row others lack (0 for the base)
    has_base: bool
    sources: dict[int, Source] = dataclasses.field(default_factory=dict)  # rows the [tokens] table gives
    external: ExternalTokenizer | None = None  # a model the merge does not read, whose tokenizer is the output's
    _means: dict[tuple[int, str], torch.Tensor] = dataclasses.field(default_factory=dict)  # see `mean_row`
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def new_rows(self) -> torch.Tensor | None:
        """The output rows the base lacks, for tokens only the models have (None without a base)."""
        if not self.has_base:
            return None
        lacking = self.maps[0] < 0
        lacking[len(self.tokens):] = False  # padding rows are matched by position
        for row in self.sources:
            lacking[row] = False
        return lacking if bool(lacking.any()) else None

    def views(self, inputs: Inputs) -> Inputs:
        """The inputs as the merge sees them: every vocabulary tensor in the output's rows (and, for the
        task-vector methods, which rows the base lacks)."""
        views = [VocabularyView(checkpoint, self, position, inputs.all)
                 for position, checkpoint in enumerate(inputs.all)]
        base = views[0] if self.has_base else None
        lacking = self.new_rows()
        new_rows = {name: lacking for name in self.tensors} if lacking is not None else {}
        return dataclasses.replace(inputs, base=base, models=views[1:] if self.has_base else views,
                                   new_rows=new_rows)

    def fill(self, position: int, name: str, rows: list[int], checkpoints: list[Checkpoint]) -> torch.Tensor:
        """Rows `rows` of tensor `name` for the input at `position`, which lacks them (float32)."""
        info = checkpoints[position].tensors[name]
        out = torch.zeros((len(rows), *info.shape[1:]), dtype=torch.float32)
        for k, row in enumerate(rows):
            if row in self.sources:  # the [tokens] table's row (None: zeros)
                source = self.sources[row]
                if source is not None:
                    out[k] = checkpoints[source[0]].read(name, (source[1], source[1] + 1))[0].float()
                continue
            base_row = int(self.maps[0][row]) if self.has_base else -1
            if self.has_base and position > 0 and base_row >= 0:
                out[k] = checkpoints[0].read(name, (base_row, base_row + 1))[0].float()
                continue
            holders = [(i, int(self.maps[i][row])) for i in range(len(checkpoints))
                       if (i > 0 or not self.has_base) and int(self.maps[i][row]) >= 0]
            if not holders and row >= len(self.tokens):  # padding no input has: the mean of its token rows
                out[k] = self.mean_row(position, name, checkpoints)
                continue
            weights = self.weights(name)
            total = sum(weights[i] for i, _ in holders)
            for i, source_row in holders:
                share = weights[i] / total if total else 1.0 / len(holders)
                out[k] += share * checkpoints[i].read(name, (source_row, source_row + 1))[0].float()
        return out


    def mean_row(self, position: int, name: str, checkpoints: list[Checkpoint]) -> torch.Tensor:
        """The mean of the input's rows for the output's tokens (its own, and those filled in for it), in
        float32 (summed in float64 over row blocks, once per tensor and input): what a padding row no
        input has gets, as mergekit fills padding (the vocabulary-expansion recipe: an unused row looks
        like an average token)."""
        key = (position, name)
        with self._lock:
            if key not in self._means:
                checkpoint = checkpoints[position]
                index = self.maps[position][:len(self.tokens)]
                rows = sorted(int(r) for r in index if r >= 0)
                total = self.fill(position, name, [i for i, r in enumerate(index.tolist()) if r < 0],
                                  checkpoints).double().sum(dim=0)
                first = 0
                while first < len(rows):  # runs of consecutive rows, a block at a time
                    last = first
                    while last + 1 < len(rows) and rows[last + 1] == rows[last] + 1 and last - first < MEAN_BLOCK_ROWS:
                        last += 1
                    total += checkpoint.read(name, (rows[first], rows[last] + 1)).double().sum(dim=0)
                    first = last + 1
                self._means[key] = (total / max(len(self.tokens), 1)).float()
            return self._means[key]


class VocabularyView:
    """A checkpoint whose vocabulary tensors have the output's rows (see the module's docstring);
    everything else is the checkpoint's own."""

    def __init__(self, checkpoint: Checkpoint, vocabulary: Vocabulary, position: int, everyone: list[Checkpoint]):
        self.checkpoint, self.vocabulary, self.position, self.everyone = checkpoint, vocabulary, position, everyone
        self.tensors = {name: (dataclasses.replace(info, shape=(vocabulary.rows, *info.shape[1:]))
                               if name in vocabulary.tensors else info) for name, info in checkpoint.tensors.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.checkpoint, name)

    def remote_reads(self, name: str, rows: tuple[int, int] | None) -> Any:
        return [] if name in self.vocabulary.tensors else self.checkpoint.remote_reads(name, rows)

    def read(self, name: str, rows: tuple[int, int] | None = None, *,
             buffer: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self.vocabulary.tensors:
            return self.checkpoint.read(name, rows, buffer=buffer)
        info: TensorInfo = self.tensors[name]
        start, stop = rows or (0, info.shape[0])
        shape = (stop - start, *info.shape[1:])
        nbytes = (stop - start) * info.row_bytes
        out = (torch.empty(shape, dtype=info.dtype) if buffer is None
               else buffer[:nbytes].view(info.dtype).view(shape))
        index = self.vocabulary.maps[self.position][start:stop].tolist()
        missing, i = [], 0
        while i < len(index):  # runs of consecutive rows of this input: one read each
            if index[i] < 0:
                missing.append(i)
                i += 1
                continue
            j = i + 1
            while j < len(index) and index[j] == index[j - 1] + 1:
                j += 1
            target = out[i:j]
            part = self.checkpoint.read(name, (index[i], index[j - 1] + 1), buffer=target.reshape(-1).view(torch.uint8))
            if part.data_ptr() != target.data_ptr():  # a state dict's tensor: a view of its own
                target.copy_(part)
            i = j
        if missing:
            filled = self.vocabulary.fill(self.position, name, [start + m for m in missing],
                                          [getattr(c, "checkpoint", c) for c in self.everyone])
            out[missing] = filled.to(info.dtype)
        return out

    def close(self) -> None:
        self.checkpoint.close()


def _config_rows(checkpoint: Checkpoint) -> int | None:
    """The config's `vocab_size` (that of its text config, for a model of several parts)."""
    config = checkpoint.config(strict=True)
    if config is None:
        return None
    rows = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return rows if isinstance(rows, int) and rows > 0 else None


NAME_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "shared", "logits")


def vocabulary_tensors(checkpoints: list[Checkpoint], rows: list[int]) -> set[str]:
    """The tensors whose rows are the vocabulary: in every input that holds one, it has that input's
    `vocab_size` rows (where all inputs have as many rows, also an embedding's or a head's name)."""
    names = {name for c in checkpoints for name, info in c.tensors.items() if info.shape}
    found = set()
    for name in names:
        held = [(c.tensors[name], own) for c, own in zip(checkpoints, rows) if name in c.tensors]
        if all(info.shape[0] == own for info, own in held):
            if len(set(rows)) > 1 or any(hint in name for hint in NAME_HINTS):
                found.add(name)
    return found


def tokenizer_file(checkpoint: Checkpoint) -> Path | None:
    """The input's tokenizer.json, unless it has none or it links out of the input (never read)."""
    path = checkpoint.directory / TOKENIZER_FILE if checkpoint.directory is not None else None
    if path is None or not path.is_file() or not regular_file(path, checkpoint.root or checkpoint.directory):
        return None
    return path


def _same_files(inputs: Inputs) -> bool:
    """Whether every input has the same tokenizer.json, or some have none at all."""
    contents = set()
    for checkpoint in inputs.all:
        path = tokenizer_file(checkpoint)
        if path is None:
            return True
        contents.add(path.read_bytes())
    return len(contents) == 1


def plan_vocabulary(recipe: Recipe, inputs: Inputs, notes: list[str]) -> Vocabulary | None:
    """The output's vocabulary and each input's rows in it; None when every input already has it.

    Raises:
        CheckpointError: an input has no tokenizer.json, or vocabularies differ beyond added tokens.
    """
    labels = recipe.input_labels
    names = [spec.name for spec in recipe.models]
    choice = recipe.tokenizer  # that it names a model, or another model's path, was checked when it was bound
    rows = [_config_rows(c) for c in inputs.all]
    if None in rows:
        return None  # not a transformers checkpoint: no vocabulary to speak of
    external = external_tokenizer(recipe)
    source = 0 if choice in ("base", "union") or external else names.index(choice) + (1 if inputs.base else 0)
    if choice == "base" and len(set(rows)) == 1 and recipe.pad_to_multiple_of is None and not recipe.tokens \
            and _same_files(inputs):
        return None  # the same tokenizer everywhere, or (some without one) nothing to match rows by: by position
    tokens = [read_tokens(c.directory, c.root or c.directory, label, rows=own)
              for c, label, own in zip(inputs.all, labels, rows)]
    reference = external.tokens if external else tokens[source]
    reference_label = f"the tokenizer of {choice}" if external else f"{labels[source]}'s"
    for label, checkpoint, own in zip(labels, inputs.all, tokens):
        if own.base != reference.base:
            differ = sorted(set(own.base.items()) ^ set(reference.base.items()))
            cannot = "they cannot be united" if choice == "union" else "its rows cannot be matched to that vocabulary"
            raise CheckpointError(checkpoint.source, f"{label}: its tokenizer's vocabulary differs from "
                                                     f"{reference_label} beyond added tokens ({len(differ)} entries "
                                                     f"differ, e.g. {differ[0][0]!r}): {cannot}",
                                  hint="merge models that share a base vocabulary (fine-tunes of one model)")
    out = [reference.by_id[i] for i in range(len(reference.by_id)) if i in reference.by_id]
    added: list[tuple[str, bool]] = []
    if choice == "union":
        known = set(out)
        for own in tokens:
            for i in sorted(own.by_id):
                token = own.by_id[i]
                if token not in known:
                    known.add(token)
                    out.append(token)
                    added.append((token, own.special.get(token, False)))
    for token in recipe.tokens:  # a token the table lists and the vocabulary lacks is added, as mergekit adds it
        if token not in out:
            out.append(token)
            added.append((token, False))
    total = max(len(out), rows[source] if not external else len(out))
    if recipe.pad_to_multiple_of:
        total = -(-total // recipe.pad_to_multiple_of) * recipe.pad_to_multiple_of
    maps = []
    for own, own_rows in zip(tokens, rows):
        index = [own.ids.get(token, -1) for token in out]
        index += [r if len(own.by_id) <= r < own_rows else -1 for r in range(len(out), total)]
        maps.append(torch.tensor(index, dtype=torch.int64))
    sources = token_sources(recipe, out, tokens, maps, recipe.input_names)
    if not sources and all(own_rows == total and torch.equal(m, torch.arange(total))
                           for m, own_rows in zip(maps, rows)):
        return None
    kept = set(out)
    for label, own in zip(labels, tokens):
        dropped = [t for t in own.ids if t not in kept]
        if dropped:
            notes.append(f"{label}: {len(dropped)} token{'s' * (len(dropped) > 1)} not in the output's vocabulary "
                         f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}): their rows are dropped; "
                         f"tokenizer = \"union\" keeps them")
    if added:
        notes.append(f"the output's vocabulary: {labels[source]}'s {len(out) - len(added)} tokens and {len(added)} "
                     f"added by the models ({', '.join(t for t, _ in added[:3])}{', ...' if len(added) > 3 else ''})"
                     f", {total} rows")
    tensors = vocabulary_tensors(inputs.all, rows)

    def weights(tensor: str) -> list[float]:  # a vocabulary tensor lies outside the layers
        return ([0.0] if inputs.base else []) + [abs(weight) for weight in recipe.weights_at(tensor)]

    return Vocabulary(out, total, choice if external else recipe.input_names[source], added, maps, tensors, weights,
                      inputs.base is not None, sources=sources, external=external)
