"""The recipe keys statistics are collected with (a method that collects them, RegMean, declares them
in its table), and the check that every model has calibration data."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from mergecli.errors import UsageError
from mergecli.recipe import ModelSpec, RecipePath, StrictModel, model_label, parse_size


class CalibrationSettings(StrictModel):
    """Where statistics go and how the calibration data is read; every path relative to the recipe."""

    stats_dir: RecipePath = Field(default="stats", validate_default=True)  # one sub-directory per model name
    num_examples: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_length: int = Field(default=512, gt=0)
    text_field: str = "text"
    # hidden states kept in RAM between blocks (beyond, spilled to disk), and the Grams of a MoE block's
    # experts summed at once (beyond, in rounds: one more forward pass of the block each)
    memory_budget: int = 2 * 10**9

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> int:
        return parse_size(value)


def require_data(models: list[tuple[int, ModelSpec]]) -> None:
    """Every model whose statistics are collected needs calibration `data`.

    Args:
        models: (position in the recipe, model) pairs.

    Raises:
        UsageError: naming every model without data.
    """
    missing = [model_label(index, spec) for index, spec in models if not spec.data]
    if missing:
        raise UsageError(f"{', '.join(missing)}: no calibration `data`",
                         hint="set `data` (a .jsonl / .txt file or an image folder) for every model")
