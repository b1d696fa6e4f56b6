"""An input's vocabulary, read from its tokenizer files as strictly as its weights: `tokenizer.json`
(its model's vocabulary and its added tokens) and, where there is one, `tokenizer_config.json`'s
`added_tokens_decoder`, which transformers numbers tokens by too.

A vocabulary matches embedding rows to tokens, so a tokenizer whose files contradict themselves or
each other would put rows under the wrong tokens. Refused, naming the file (or both): two tokens with
one id, an added token given twice or numbered otherwise than the vocabulary word it repeats, ids with
a gap or past the embedding's rows, an `added_tokens_decoder` that disagrees with `tokenizer.json`,
a file that is not the JSON object it should be, and a token longer than any real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergecli.errors import CheckpointError
from mergecli.io.files import regular_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_TOKEN_CHARS = 4096  # the longest tokens of real vocabularies are runs of a few hundred spaces or dashes
MAX_FILE_BYTES = 200_000_000  # the largest tokenizer.json files are some 35 MB


@dataclass
class Tokens:
    """One input's vocabulary: its tokens by id, and which of them were added to its base vocabulary."""

    by_id: dict[int, str]
    ids: dict[str, int]
    base: dict[str, int]  # the vocabulary of the tokenizer's model, added tokens apart
    special: dict[str, bool]  # added token → special


def _json_object(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise CheckpointError(path, f"is larger than {MAX_FILE_BYTES // 10**6} MB; no tokenizer file is")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(path, f"is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, "is not a JSON object")
    return value


def _token(path: Path, value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise CheckpointError(path, f"{where}: a token that is not a string")
    if len(value) > MAX_TOKEN_CHARS:
        raise CheckpointError(path, f"{where}: a token of {len(value):,} characters; real tokens have at most "
                                    "a few hundred")
    return value


def _model_vocabulary(path: Path, tokenizer: dict) -> dict[str, int]:
    """The vocabulary of the tokenizer's model: a mapping (BPE, WordPiece, WordLevel) or a list of
    (piece, score) pairs numbered by position (Unigram)."""
    vocab = (tokenizer.get("model") or {}).get("vocab") if isinstance(tokenizer.get("model"), dict) else None
    found: dict[str, int] = {}
    owner: dict[int, str] = {}
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list) and all(isinstance(entry, list) and entry for entry in vocab):
        pairs = [(entry[0], index) for index, entry in enumerate(vocab)]
    else:
        raise CheckpointError(path, "holds no vocabulary (model.vocab) to match embedding rows by")
    for token, number in pairs:
        token = _token(path, token, "model.vocab")
        if type(number) is not int or number < 0:
            raise CheckpointError(path, f"model.vocab: token {token!r} has the id {number!r}, not a row number")
        if number in owner:
            raise CheckpointError(path, f"model.vocab: id {number} is given to both {owner[number]!r} and {token!r}")
        owner[number], found[token] = token, number
    return found


def read_tokens(directory: Path, root: Path, label: str, *, rows: int) -> Tokens:
    """An input's vocabulary from its tokenizer files, checked against each other and against the
    `rows` of its embedding.

    Raises:
        CheckpointError: no tokenizer.json, or files that contradict themselves or each other.
    """
    path = directory / TOKENIZER_FILE
    if not regular_file(path, root):
        raise CheckpointError(directory, f"{label} has no {TOKENIZER_FILE}, so its embedding rows cannot be "
                                         "matched to tokens",
                              hint="add its tokenizer files, or give every input the same vocabulary")
    tokenizer = _json_object(path)
    base = _model_vocabulary(path, tokenizer)
    ids, by_id = dict(base), {number: token for token, number in base.items()}
    special: dict[str, bool] = {}
    added = tokenizer.get("added_tokens") or []
    if not isinstance(added, list):
        raise CheckpointError(path, "added_tokens is not a list")
    for entry in added:
        if not isinstance(entry, dict) or type(entry.get("id")) is not int or entry["id"] < 0:
            raise CheckpointError(path, f"added_tokens: an entry without a row number ({str(entry)[:80]})")
        token, number = _token(path, entry.get("content"), "added_tokens"), entry["id"]
        if token in special:
            raise CheckpointError(path, f"added_tokens: {token!r} is added twice")
        if token in ids and ids[token] != number:
            raise CheckpointError(path, f"added_tokens: {token!r} has the id {number}, but it is already the "
                                        f"vocabulary's token {ids[token]}")
        if by_id.get(number, token) != token:
            raise CheckpointError(path, f"added_tokens: {token!r} has the id {number}, which is the vocabulary's "
                                        f"{by_id[number]!r}")
        ids[token], by_id[number], special[token] = number, token, bool(entry.get("special"))
    top = max(by_id, default=-1)
    if len(by_id) != top + 1:
        gap = next(number for number in range(top + 1) if number not in by_id)
        raise CheckpointError(path, f"no token has the id {gap}, though the ids run to {top}: a vocabulary's ids "
                                    "number its rows without a gap")
    if top >= rows:
        raise CheckpointError(path, f"its tokens run to id {top}, past the {rows} rows of the embedding of {label}",
                              hint="the tokenizer does not belong to these weights")
    _check_decoder(directory, root, path, by_id)
    return Tokens(by_id, ids, base, special)


def _check_decoder(directory: Path, root: Path, tokenizer: Path, by_id: dict[int, str]) -> None:
    """tokenizer_config.json's `added_tokens_decoder` (id → token) must agree with tokenizer.json."""
    path = directory / TOKENIZER_CONFIG
    if not regular_file(path, root):
        return
    decoder = _json_object(path).get("added_tokens_decoder")
    if decoder is None:
        return
    if not isinstance(decoder, dict):
        raise CheckpointError(path, "added_tokens_decoder is not a mapping of ids to tokens")
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not key.isdigit() or not isinstance(content, str):
            raise CheckpointError(path, f"added_tokens_decoder: entry {key[:20]!r} is not an id with its token")
        if by_id.get(int(key)) != content:
            theirs = by_id.get(int(key))
            said = f"{tokenizer.name} gives it to {theirs!r}" if theirs is not None else f"{tokenizer.name} has no " \
                                                                                            "such id"
            raise CheckpointError(path, f"added_tokens_decoder gives the id {key} to {content[:60]!r}, {said}",
                                  hint="the tokenizer's files disagree; save the tokenizer again with transformers")
