"""Calibration data for RegMean statistics: a file or folder of examples → padded model batches.

Three kinds of data, chosen by what `data` points at:

- `.jsonl`: one JSON object per line; its `text_field` (default `text`) is the example, or its
  `messages` list, rendered with the tokenizer's chat template;
- any other file (`.txt`): one example per non-blank line;
- a directory: an image folder (png, jpg, ...), run through the checkpoint's image processor.

Texts are tokenized one by one (truncated to `max_length`), sorted by length so that batches
hold little padding, and right-padded; each batch carries a mask of its real tokens, and padding
never enters a statistic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergecli.errors import StatsError, UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DataKind = Literal["text", "image"]


@dataclass(frozen=True)
class CalibrationData:
    """The examples of one model's calibration data (at most `requested`), not yet tokenized.

    `examples` holds strings (plain text), lists of chat messages, or image paths.
    """

    path: Path
    kind: DataKind
    examples: list[Any]
    requested: int
    sha256: str  # of the raw examples used, so that changed data makes statistics stale
    warnings: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """Model inputs for one batch; `mask` marks real tokens `(batch, seq)` (None: all are real)."""

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor | None
    examples: int

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Batch:
        """Move to `device`; floating inputs (pixel values) also to the model's `dtype`."""
        moved = {}
        for key, value in self.inputs.items():
            if value.is_floating_point() and dtype is not None:
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        mask = self.mask.to(device) if self.mask is not None else None
        return Batch(moved, mask, self.examples)


def read_examples(path: str | Path, *, num_examples: int, text_field: str = "text",
                  label: str = "data") -> CalibrationData:
    """Read the first `num_examples` examples of a calibration file or image folder.

    Args:
        path: a `.jsonl` file, a plain text file (one example per line) or an image folder.
        num_examples: how many examples to use; fewer is a warning, none an error.
        text_field: the jsonl field holding the text (a `messages` field is used otherwise).
        label: names the data in messages, e.g. `models.0.data (math)`.

    Raises:
        UsageError: the path does not exist.
        StatsError: the data is empty or malformed.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{label}: calibration data {path} does not exist",
                         hint="point `data` at a .jsonl or .txt file, or a folder of images")
    digest = hashlib.sha256()
    if path.is_dir():
        kind: DataKind = "image"
        examples: list[Any] = sorted(p for p in path.iterdir()
                                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:num_examples]
        for image in examples:
            digest.update(image.name.encode() + b"\0" + image.read_bytes())
        empty = f"{label}: the folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
    else:
        kind = "text"
        examples = []
        if path.suffix.lower() == ".json":
            raise UsageError(f"{label}: {path} is a .json file; calibration data is JSON Lines (.jsonl, one "
                             "object per line), plain text (one example per line) or an image folder")
        is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
        try:
            with open(path, encoding="utf-8") as lines:
                for number, line in enumerate(lines, start=1):
                    if len(examples) >= num_examples:
                        break
                    if not line.strip():
                        continue
                    example = _jsonl_example(line, path, number, text_field) if is_jsonl else line.rstrip("\n")
                    if example is not None:
                        examples.append(example)
                        digest.update(line.encode())
        except UnicodeDecodeError:
            raise StatsError(f"{label}: {path} is not UTF-8 text") from None
        except OSError as exc:
            raise StatsError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
        empty = f"{label}: {path} holds no calibration examples (it is empty)"
    if not examples:
        raise StatsError(empty, hint="add examples to the data, or point `data` at another file")
    warnings = []
    if len(examples) < num_examples:
        warnings.append(f"{label}: {path} has {len(examples)} example{'s' * (len(examples) != 1)}, "
                        f"fewer than num_examples = {num_examples}; using all of them")
    return CalibrationData(path, kind, examples, num_examples, digest.hexdigest(), warnings)


def _jsonl_example(line: str, path: Path, number: int, text_field: str) -> Any:
    try:
        record = json.loads(line)
    except ValueError:
        raise StatsError(f"{path}:{number}: not valid JSON") from None
    if not isinstance(record, dict):
        raise StatsError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    if text_field in record:
        text = record[text_field]
        if not isinstance(text, str):
            raise StatsError(f"{path}:{number}: field {text_field!r} is not a string")
        return text if text.strip() else None
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return messages
    raise StatsError(f"{path}:{number}: no {text_field!r} field and no 'messages' list",
                     hint="set regmean.text_field to the field that holds the text")


# ---------------------------------------------------------------------------------------------
# Text


def tokenize_examples(examples: list[Any], tokenizer: Any, *, max_length: int,
                      label: str = "data") -> list[list[int]]:
    """Token ids of each example, truncated to `max_length`; chat messages through the template."""
    token_ids = []
    for number, example in enumerate(examples, start=1):
        if isinstance(example, list):
            if not getattr(tokenizer, "chat_template", None):
                raise StatsError(f"{label}: example {number} has 'messages', but the model's tokenizer "
                                 "has no chat template", hint="give plain text in `text_field` instead")
            text = tokenizer.apply_chat_template(example, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)
        else:
            ids = tokenizer(example, truncation=True, max_length=max_length)
        token_ids.append(list(ids["input_ids"])[:max_length])
    return token_ids


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the pad token, else end-of-sequence, else 0 (it is masked anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def text_batches(token_ids: list[list[int]], *, batch_size: int, pad_token_id: int,
                 shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Right-padded batches of `input_ids` + `attention_mask`, longest examples first.

    Args:
        token_ids: one list of ids per example (empty ones are skipped).
        shard: `(rank, world_size)`: this process takes every world_size-th example.
    """
    rank, world = shard
    order = sorted((i for i, ids in enumerate(token_ids) if ids), key=lambda i: -len(token_ids[i]))
    mine = order[rank::world]
    for start in range(0, len(mine), batch_size):
        rows = [token_ids[i] for i in mine[start:start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = True
        yield Batch({"input_ids": input_ids, "attention_mask": mask.long()}, mask, len(rows))


def count_text_examples(token_ids: list[list[int]], shard: tuple[int, int] = (0, 1)) -> int:
    """How many examples `text_batches` yields for this shard."""
    return len([ids for ids in token_ids if ids][shard[0]::shard[1]])


# ---------------------------------------------------------------------------------------------
# Images


def image_batches(images: list[Path], processor: Any, *, batch_size: int,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[Batch]:
    """Batches of `pixel_values` from the checkpoint's image processor (every patch is real)."""
    from PIL import Image, UnidentifiedImageError

    mine = images[shard[0]::shard[1]]
    for start in range(0, len(mine), batch_size):
        loaded = []
        for path in mine[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    loaded.append(image.convert("RGB"))
            except (OSError, UnidentifiedImageError):
                raise StatsError(f"{path}: not a readable image") from None
        pixels = processor(images=loaded, return_tensors="pt")["pixel_values"]
        yield Batch({"pixel_values": pixels}, None, len(loaded))


# ---------------------------------------------------------------------------------------------
# A model's batches


def _load_tokenizer(directory: Path, label: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatsError(f"{label}: cannot load the tokenizer of {directory}: {_first_line(exc)}",
                         hint="text calibration data needs the checkpoint's tokenizer files") from None


def _load_processor(directory: Path, label: str) -> Any:
    import transformers

    if not (directory / "preprocessor_config.json").is_file():
        raise StatsError(f"{label}: {directory} has no preprocessor_config.json",
                         hint="image calibration data needs the checkpoint's image processor")
    try:
        return transformers.AutoImageProcessor.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StatsError(f"{label}: cannot load the image processor of {directory}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def model_batches(data: CalibrationData, directory: Path, *, batch_size: int, max_length: int,
                  max_positions: int | None, shard: tuple[int, int] = (0, 1), label: str = "data",
                  warnings: list[str] | None = None) -> tuple[list[Batch], int]:
    """This process's batches of a model's calibration data, tokenized (or image-processed) with the
    checkpoint's own tokenizer (or processor) in `directory`.

    Returns:
        The batches (on the CPU), and the token limit used (0 for images).

    Raises:
        UsageError: fewer examples than processes.
        StatsError: no tokenizer / processor, or examples that tokenize to nothing.
    """
    if len(data.examples) < shard[1]:
        raise UsageError(f"{label}: {len(data.examples)} examples cannot be split across "
                         f"{shard[1]} processes", hint="use fewer processes or more examples")
    if data.kind == "image":
        processor = _load_processor(directory, label)
        return list(image_batches(data.examples, processor, batch_size=batch_size, shard=shard)), 0
    if max_positions is not None and max_length > max_positions:
        if warnings is not None:
            warnings.append(f"{label}: max_length {max_length} is more than the model's {max_positions} positions; "
                            f"examples are truncated to {max_positions} tokens")
        max_length = max_positions
    tokenizer = _load_tokenizer(directory, label)
    token_ids = tokenize_examples(data.examples, tokenizer, max_length=max_length, label=f"{label}.data")
    if not count_text_examples(token_ids, shard):
        raise StatsError(f"{label}: the calibration examples tokenize to nothing")
    return list(text_batches(token_ids, batch_size=batch_size, pad_token_id=pad_id(tokenizer), shard=shard)), max_length
