"""The recipe schema: strict, frozen pydantic models of the TOML keys (unknown keys are errors,
booleans are true or false), with the models' default names and the weights' arithmetic.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    field_validator,
    model_validator,
)

Dtype = Literal["auto", "float32", "float16", "bfloat16"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
Flag = Annotated[bool, Strict()]  # true or false only: "no" or 0 is not a boolean
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HEAD_PATTERNS = [r"lm_head\..*", r"score\..*", r"classifier\..*"]  # `head`'s default
METHOD_TABLES = ("regmean",)  # tables that only the method of the same name reads


def parse_size(value: int | str) -> int:
    """Parse `5GB` (10^9), `500MiB` (2^20) or a plain byte count into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '5GB'")
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as '5GB' or '500MB', got {value!r}")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError("size must be positive")
    return size


GENERIC_FILES = ("model", "pytorch_model", "model.safetensors", "adapter_model")  # names that say nothing


def _default_name(path: str, depth: int = 1) -> str:
    """A model's name from its path: the last component without its weight suffix, or its folder's
    for a generic file name (`a/model.safetensors` → `a`); `depth` more components when needed to
    tell models apart (`x/a` and `y/a` → `x-a`, `y-a`)."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        return path
    last = parts[-1]
    for suffix in WEIGHT_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            last = last[: -len(suffix)]
    if last in GENERIC_FILES and len(parts) > 1:
        parts = parts[:-1]
    else:
        parts[-1] = last
    name = "-".join(parts[-depth:])
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class BaseSpec(_Strict):
    """The pretrained model: source of head / excluded / integer tensors; never averaged."""

    path: str = Field(min_length=1)
    revision: str | None = None
    digest: Digest | None = None  # a local checkpoint's identity, recorded in an output's mergecli.toml


class ModelSpec(_Strict):
    """One model to merge."""

    path: str = Field(min_length=1)
    revision: str | None = None
    digest: Digest | None = None
    name: str = ""
    weight: float = Field(default=1.0, allow_inf_nan=False)
    data: str | None = None

    @field_validator("name")
    @classmethod
    def _name_names_a_directory(cls, name: str) -> str:
        if name and (not _NAME_RE.fullmatch(name) or name in {".", ".."}):
            raise ValueError(f"name {name!r} must be letters, digits, '.', '_' or '-' (it names a stats directory)")
        return name


class RegMeanSettings(_Strict):
    stats_dir: str = "stats"
    num_examples: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0)
    max_length: int = Field(default=512, gt=0)
    text_field: str = "text"
    reduce_non_diagonal_ratio: float = Field(default=0.6, ge=0.0, le=1.0)
    sequential: Flag = False  # RegMean++: block l's Grams from inputs through the merged blocks 0..l-1
    memory_budget: int = 2 * 10**9  # hidden states kept in RAM between blocks; beyond, spilled to disk

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> int:
        return parse_size(value)


class PushSettings(_Strict):
    repo_id: str | None = None
    private: Flag = False
    revision: str | None = None
    message: str | None = None


class Recipe(_Strict):
    """A merge recipe, as in the spec's TOML schema."""

    method: str = Field(default="average", min_length=1)  # a registered method (methods/base.py)
    output: str | None = None
    dtype: Dtype = "auto"
    shard_size: int = 5 * 10**9
    copy_tokenizer: Flag = True
    normalize: Flag = True
    backbone_only: Flag = False
    allow_non_finite: Flag = False  # true: NaN / inf in an input or the result is a warning, not an error
    head: list[str] | None = None
    exclude: list[str] = []
    base: BaseSpec | None = None
    models: list[ModelSpec] = Field(min_length=1)
    regmean: RegMeanSettings = RegMeanSettings()
    push_to_hub: Flag = False
    push: PushSettings | None = None
    _source: str = PrivateAttr(default="recipe")

    @property
    def source(self) -> str:
        """Where the recipe came from (its file, or "command line"): what errors about it name."""
        return self._source

    @field_validator("shard_size", mode="before")
    @classmethod
    def _parse_shard_size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("head", "exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _check_models(self) -> Recipe:
        _fill_names(self.models)
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; set `name` for: {', '.join(duplicates)}")
        if self.normalize and math.fsum(scaled_weights(self.models)[0]) == 0.0:
            raise ValueError("weights sum to 0, so they cannot be normalized (set normalize = false?)")
        if self.push_to_hub and not (self.push and self.push.repo_id):
            raise ValueError("push_to_hub = true needs [push] repo_id")
        return self

    @property
    def head_patterns(self) -> list[str]:
        """The regexes of head tensors for `backbone_only` (the `head` key, else HEAD_PATTERNS)."""
        return self.head if self.head is not None else HEAD_PATTERNS

    @property
    def weights(self) -> list[float]:
        """The models' weights, normalized to sum 1 when `normalize` (what the card shows)."""
        scaled, divisor = self.average_weights()
        return [w / divisor for w in scaled]

    def average_weights(self) -> tuple[list[float], float]:
        """The weights scaled by a power of two (exactly: huge or tiny weights neither overflow nor
        underflow), and what the weighted sum is divided by, once, at the end: their total with
        `normalize`, else the power of two that undoes the scaling."""
        scaled, scale = scaled_weights(self.models)
        return scaled, (math.fsum(scaled) if self.normalize else scale)


def _fill_names(models: list[ModelSpec]) -> None:
    """Give every model without a `name` one from its path, unique among the recipe's models when
    the paths allow (more of the path, as needed)."""
    unnamed = [m for m in models if not m.name]
    depth = dict.fromkeys(range(len(unnamed)), 1)
    taken = [m.name for m in models if m.name]
    for _ in range(8):
        names = [_default_name(m.path, depth[i]) for i, m in enumerate(unnamed)]
        clashing = [i for i, name in enumerate(names) if names.count(name) > 1 or name in taken]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    for model, name in zip(unnamed, names):
        object.__setattr__(model, "name", name)


def scaled_weights(models: list[ModelSpec]) -> tuple[list[float], float]:
    """The models' weights × 2^-e, the largest of them in [1, 2) (equal weights become exactly 1,
    which the sum needs no multiplication for), and 2^-e."""
    exponent = max((math.frexp(m.weight)[1] - 1 for m in models if m.weight), default=0)
    return [math.ldexp(m.weight, -exponent) for m in models], math.ldexp(1.0, -exponent)
