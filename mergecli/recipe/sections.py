"""The recipe's sections beyond its models: `[[slices]]` (an output built from layer ranges of the models,
as mergekit's slices), `[tokens]` (where a token's embedding row comes from) and the chat template.

    [[slices]]
    sources = [{ model = "a", layers = [0, 16] }, { model = "b", layers = [0, 16], weight = 0.3 }]
    [slices.slerp]                  # the slice's own settings of the method (beside the recipe's [slerp])
    t = 0.3

    [tokens."<|im_start|>"]
    source = "chat"                 # a model's name, "base", "zero", or { model = "chat", token = "<s>" }
    force = true                    # its row from there in every model, even in those that have the token
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PrivateAttr, field_validator, model_validator

from mergecli.recipe.strict import StrictModel
from mergecli.recipe.varying import Varying

CHAT_TEMPLATES = ("chatml", "llama3", "mistral", "alpaca", "exaone")  # named templates; or "auto", or Jinja text


def _split_method_keys(cls: type, data: Any) -> tuple[dict[str, Any], Any]:
    if not isinstance(data, dict):
        return {}, data
    ours = {key: value for key, value in data.items() if key not in cls.model_fields}
    return ours, {key: value for key, value in data.items() if key in cls.model_fields}


class SliceSource(StrictModel):
    """One source of a slice: a model of the recipe (or "base") and its layers `[start, stop)`; a
    model's keys (`weight`, `density`) set here win over the model's entry for this slice."""

    model: str = Field(min_length=1)
    layers: tuple[int, int]
    weight: Varying(float, strict=True, allow_inf_nan=False) | None = None
    _options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_method_keys(cls, data: Any, handler: Any) -> Any:
        options, data = _split_method_keys(cls, data)
        source = handler(data)
        source._options = options
        return source

    @field_validator("layers")
    @classmethod
    def _a_range(cls, layers: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= layers[0] < layers[1]:
            raise ValueError(f"expected [start, stop) with 0 <= start < stop, got {list(layers)}")
        return layers

    @property
    def options(self) -> dict[str, Any]:
        """The method's keys this source sets (`density`), as written."""
        return self._options

    @property
    def count(self) -> int:
        return self.layers[1] - self.layers[0]

class SliceSpec(StrictModel):
    """An output slice: its sources, of equal lengths, merged with the recipe's method (one source:
    its layers as they are); a table named after the method sets its settings within the slice."""

    sources: list[SliceSource] = Field(min_length=1)
    _tables: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_method_tables(cls, data: Any, handler: Any) -> Any:
        tables, data = _split_method_keys(cls, data)
        spec = handler(data)
        spec._tables = tables
        return spec

    @model_validator(mode="after")
    def _equal_lengths(self) -> Any:
        counts = {source.count for source in self.sources}
        if len(counts) > 1:
            raise ValueError(f"the sources of a slice have different lengths "
                             f"({', '.join(str(source.count) for source in self.sources)} layers)")
        return self

    @property
    def tables(self) -> dict[str, Any]:
        return self._tables

    @property
    def count(self) -> int:
        return self.sources[0].count

class TokenSpec(StrictModel):
    """Where one token's embedding row comes from: `source` (a model's name, "base", "zero", or
    `{model, token}` / `{model, token_id}`: another token's row of that model), for the models that
    lack the token, or, with `force`, for every model."""

    source: str | dict[str, Any] | None = None
    force: bool = False

    @field_validator("source")
    @classmethod
    def _a_source(cls, source: Any) -> Any:
        if isinstance(source, dict):
            unknown = [key for key in source if key not in ("model", "token", "token_id")]
            if unknown or not isinstance(source.get("model"), str) or \
                    ("token" in source) == ("token_id" in source):
                raise ValueError("expected a model's name, \"base\", \"zero\", or {model, token} / {model, "
                                 "token_id}")
            if "token_id" in source and (type(source["token_id"]) is not int or source["token_id"] < 0):
                raise ValueError("token_id must be a row number")
            if "token" in source and not isinstance(source["token"], str):
                raise ValueError("token must be a string")
        return source

    @model_validator(mode="after")
    def _force_needs_a_source(self) -> Any:
        if self.force and self.source is None:
            raise ValueError("force takes the token's row from its source: give a source")
        return self
