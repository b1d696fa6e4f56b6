"""Where tokens' embedding rows come from, beyond matching them by token: the recipe's `[tokens]` table
(mergekit's `tokenizer.tokens`), and a tokenizer taken from a model the merge does not read
(`tokenizer = "org/other-model"`, mergekit's `tokenizer_source` naming such a model).

A table entry gives one token's row for the models that lack the token, or, with `force`, for every
model: a model's row of that token (`source = "chat"`, or "base"), another token's row of a model
(`{model = "chat", token = "<s>"}` / `{model, token_id}`), or zeros (`"zero"`). A token the table lists
that the output's vocabulary lacks is added to it, as mergekit adds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mergecli.errors import CheckpointError, RecipeError
from mergecli.io import hub
from mergecli.io.tokens import Tokens, read_tokens
from mergecli.recipe import Recipe

Source = tuple[int, int] | None  # (an input's place in Inputs.all, its row), or None for zeros


@dataclass
class ExternalTokenizer:
    """The tokenizer of a model the merge does not read: its vocabulary, and the folder of its files."""

    tokens: Tokens
    directory: Path
    root: Path  # the tree its files may link into (a hub snapshot's repo folder)


def external_tokenizer(recipe: Recipe) -> ExternalTokenizer | None:
    """The recipe's `tokenizer` when it names no model of the recipe but another model (a local folder
    or a hub repo id) whose tokenizer the output takes; None otherwise.

    Raises:
        CheckpointError: that model has no readable tokenizer; HubError: the hub refused.
    """
    choice = recipe.tokenizer
    if choice in ("base", "union", *(spec.name for spec in recipe.models)):
        return None
    local = Path(choice)
    if local.is_dir():
        directory = root = local
    elif hub.names_repo(choice):
        snapshot = hub.resolve(choice)
        directory, root = snapshot.folder, snapshot.folder.parent.parent
    else:
        raise CheckpointError(choice, "no such model folder to take the tokenizer from")
    rows = None
    if (directory / "config.json").is_file():
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
            rows = config.get("vocab_size") if isinstance(config, dict) else None
        except (OSError, ValueError, UnicodeDecodeError):
            rows = None
    tokens = read_tokens(directory, root, f"tokenizer {choice}", rows=rows if isinstance(rows, int) else 2**31)
    return ExternalTokenizer(tokens, directory, root)


def token_sources(recipe: Recipe, out: list[str], tokens: list[Tokens], maps: list[torch.Tensor],
                  names: list[str]) -> dict[int, Source]:
    """The rows the `[tokens]` table gives a source, by output row; a forced token's row is marked missing
    in every input's map (`maps`, changed in place), so that every input takes it from its source.

    Args:
        out: the output's tokens, by row.
        tokens: each input's vocabulary, in Inputs.all order, whose names are `names` ("base", models').

    Raises:
        RecipeError: a source model that lacks the token, or a row past its embedding.
    """
    sources: dict[int, Source] = {}
    row_of = {token: row for row, token in enumerate(out)}
    for token, spec in recipe.tokens.items():
        if spec.source is None:
            continue
        row = row_of[token]
        where = f"tokens.{token}.source"
        if spec.source == "zero":
            sources[row] = None
        else:
            model = spec.source["model"] if isinstance(spec.source, dict) else spec.source
            at = names.index(model)
            if isinstance(spec.source, dict) and "token_id" in spec.source:
                found = spec.source["token_id"]
                if found not in tokens[at].by_id:
                    raise RecipeError(recipe.source, [recipe.locate(f"{where}: {model} has no token {found}")])
            else:
                wanted = spec.source["token"] if isinstance(spec.source, dict) else token
                found = tokens[at].ids.get(wanted)
                if found is None:
                    raise RecipeError(recipe.source, [recipe.locate(f"{where}: {model} has no token {wanted!r}")])
            sources[row] = (at, found)
        if spec.force:
            for index in maps:
                index[row] = -1
    return sources
