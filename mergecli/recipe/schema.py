"""The recipe schema: strict, frozen pydantic models of the TOML keys (unknown keys are errors,
booleans are true or false), with the models' default names and the weights' arithmetic.

The keys every recipe shares are declared here. A method's own settings (the table named after it,
`[regmean]`, `[ties]`, and the keys it adds to a `[[models]]` entry, such as `density`) are declared
by the method (methods/base.py `Method.settings`): here they are kept as written, and the method
validates them when the recipe is bound to it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mergecli.exact import common_fraction
from mergecli.recipe.names import fill_names
from mergecli.recipe.sections import CHAT_TEMPLATES, SliceSpec, TokenSpec
from mergecli.recipe.strict import Flag, StrictModel
from mergecli.recipe.varying import Varying, evaluate, varies

Dtype = Literal["auto", "float32", "float16", "bfloat16", "float8_e4m3fn"]

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
HEAD_PATTERNS = [r"lm_head\..*", r"score\..*", r"classifier\..*"]  # `head`'s default
STAGE = "stage:"  # a model path that names an earlier stage of the recipe


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


def _split(data: Any, method_key: Callable[[str, Any], bool]) -> tuple[dict[str, Any], Any]:
    """(the keys of a raw table that belong to the recipe's method, the rest)."""
    if not isinstance(data, dict):
        return {}, data
    ours = {key: value for key, value in data.items() if method_key(key, value)}
    return ours, {key: value for key, value in data.items() if key not in ours}


class _RelativePath:
    """Marks a recipe key that holds a path relative to the recipe file (see `RecipePath`)."""


RELATIVE_PATH = _RelativePath()


def _from_recipe_directory(path: str, info: ValidationInfo) -> str:
    base_dir = (info.context or {}).get("base_dir")
    return os.path.abspath(Path(base_dir) / Path(path).expanduser()) if base_dir is not None else path


# A path in a method's table (`stats_dir`): relative to the recipe's directory, made absolute when the
# method validates its table (the context gives `base_dir`), relative to the output in mergecli.toml.
RecipePath = Annotated[str, AfterValidator(_from_recipe_directory), RELATIVE_PATH]


def path_keys(model: type[BaseModel]) -> list[str]:
    """The keys of a table that are `RecipePath`s."""
    return [name for name, field in model.model_fields.items() if RELATIVE_PATH in field.metadata]


def model_label(index: int, spec: ModelSpec) -> str:
    """How messages name a model of the recipe: `models.1 (math)`."""
    return f"models.{index} ({spec.name})"


Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class BaseSpec(StrictModel):
    """The pretrained model: source of head / excluded / integer tensors; never averaged."""

    path: str = Field(min_length=1)
    revision: str | None = None
    digest: Digest | None = None  # a local checkpoint's identity, recorded in an output's mergecli.toml
    hub_id: str | None = None  # the hub repo a local checkpoint is a copy of: the card's base_model


class ModelSpec(StrictModel):
    """One model to merge. Keys that the recipe's method adds per model (`density`) are kept as written
    in `options`, and validated by the method."""

    path: str = Field(min_length=1)
    revision: str | None = None
    digest: Digest | None = None
    hub_id: str | None = None  # the hub repo a local checkpoint is a copy of: the card's base_model
    name: str = ""
    # 0.3, never "0.3"; or varying by tensor (recipe/varying.py)
    weight: Varying(float, strict=True, allow_inf_nan=False) = 1.0
    data: str | None = None
    base: str | None = None  # a LoRA adapter's base model (else its adapter_config's, else the recipe's [base])
    _options: dict[str, Any] = PrivateAttr(default_factory=dict)
    _settings: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_method_keys(cls, data: Any, handler: Any) -> ModelSpec:
        options, data = _split(data, lambda key, value: key not in cls.model_fields)
        spec = handler(data)
        spec._options = options
        return spec

    @property
    def options(self) -> dict[str, Any]:
        """The keys of this entry that the recipe's method declares, as written."""
        return self._options

    @property
    def settings(self) -> Any:
        """This model's own settings, as the recipe's method validated them (None if it declares none)."""
        return self._settings

    @field_validator("name")
    @classmethod
    def _name_names_a_directory(cls, name: str) -> str:
        if name and (not _NAME_RE.fullmatch(name) or name in {".", ".."}):
            raise ValueError(f"name {name!r} must be letters, digits, '.', '_' or '-' (it names a stats directory)")
        return name


class PushSettings(StrictModel):
    repo_id: str | None = None
    private: Flag = False
    revision: str | None = None
    message: str | None = None


class Recipe(StrictModel):
    """A merge recipe, as in the spec's TOML schema."""

    method: str = Field(default="average", min_length=1)  # a registered method (methods/base.py)
    output: str | None = None
    dtype: Dtype = "auto"
    shard_size: int = 5 * 10**9
    copy_tokenizer: Flag = True
    tokenizer: str = Field(default="base", min_length=1)  # the output's vocabulary: "base", "union" or a model's name
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=2**20)  # vocabulary rows rounded up to a multiple
    normalize: Flag | None = None  # divide by the sum of the weights; unset: the method's default
    backbone_only: Flag = False
    allow_non_finite: Flag = False  # true: NaN / inf in an input or the result is a warning, not an error
    stream: Flag = False  # hub inputs read by range requests as the merge needs them, never downloaded
    stream_connections: int = Field(default=8, ge=1, le=64)  # concurrent range requests
    stream_buffer: int = 256 * 2**20  # bytes fetched ahead of the merge, at most
    head: list[str] | None = None
    exclude: list[str] = []
    base: BaseSpec | None = None
    models: list[ModelSpec] = Field(min_length=1)
    slices: list[SliceSpec] | None = None  # the output's layers, from layer ranges of the models
    tokens: dict[str, TokenSpec] = {}  # where a token's embedding row comes from
    chat_template: str | None = None  # a named template, "auto", or Jinja text: into tokenizer_config.json
    stages: list[Recipe] | None = None  # earlier merges, which models name as `stage:NAME`
    name: str | None = None  # a stage's name
    push_to_hub: Flag = False
    push: PushSettings | None = None
    output_format: Literal["safetensors", "lora"] = "safetensors"  # lora: the merge's difference from [base]
    lora_rank: int | None = Field(default=None, ge=1)  # the factors' rank (default 16 without lora_error)
    lora_error: float | None = Field(default=None, gt=0, lt=1)  # the least rank within it (lora_rank: at most)
    _source: str = PrivateAttr(default="recipe")
    _base_dir: Path | None = PrivateAttr(default=None)
    _overrides: list[str] = PrivateAttr(default_factory=list)  # the keys `--set` gave, for messages
    _tables: dict[str, Any] = PrivateAttr(default_factory=dict)
    _settings: BaseModel | None = PrivateAttr(default=None)
    _locate: Callable[[str], str] | None = PrivateAttr(default=None)  # a converted config's key and line
    _notes: list[str] = PrivateAttr(default_factory=list)  # what its conversion left out, and why

    @model_validator(mode="wrap")
    @classmethod
    def _keep_method_tables(cls, data: Any, handler: Any) -> Recipe:
        tables, data = _split(data, lambda key, value: key not in cls.model_fields and isinstance(value, dict))
        recipe = handler(data)
        recipe._tables = tables
        return recipe

    @property
    def source(self) -> str:
        """Where the recipe came from (its file, or "command line"): what errors about it name."""
        return self._source

    @property
    def base_dir(self) -> Path | None:
        """The directory its relative paths are relative to (the recipe file's)."""
        return self._base_dir

    @property
    def overrides(self) -> list[str]:
        """The keys `--set` gave (`models.1.weight`): a problem with one of them is said to be theirs."""
        return self._overrides

    @property
    def notes(self) -> list[str]:
        """What reading it left out, and why (a setting mergekit ignores, in a converted config)."""
        return self._notes

    def locate_with(self, locate: Callable[[str], str]) -> None:
        """Say problems with this recipe's keys at the place they came from (a mergekit config's line)."""
        self._locate = locate

    def locate(self, problem: str) -> str:
        """A problem with one of its keys (`models.1.weight: ...`), said where that key came from."""
        return self._locate(problem) if self._locate is not None else problem

    @property
    def tables(self) -> dict[str, Any]:
        """The tables that are not common keys, as written: the method's own (`[ties]`), or others."""
        return self._tables

    @property
    def settings(self) -> Any:
        """The method's own table, as the method validated it: None until the recipe is bound to its
        method (`methods.base.method_of`), or if the method declares none."""
        return self._settings

    def bind(self, settings: BaseModel | None, model_settings: list[BaseModel | None]) -> None:
        """Keep the method's validated settings (its table, and each model's keys): derived data,
        set once by `methods.base.method_of`."""
        self._settings = settings
        for spec, options in zip(self.models, model_settings):
            spec._settings = options

    @field_validator("shard_size", "stream_buffer", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> int:
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

    @field_validator("chat_template")
    @classmethod
    def _a_template(cls, template: str | None) -> str | None:
        if template is None or template in ("auto", *CHAT_TEMPLATES) or ("{" in template and len(template) >= 20):
            return template
        raise ValueError(f"expected a named template ({', '.join(CHAT_TEMPLATES)}), \"auto\" (the inputs' most "
                         "common one) or a Jinja template")

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        names = []
        for index, stage in enumerate(self.stages or []):
            where = f"stages.{index}"
            if not stage.name or not _NAME_RE.fullmatch(stage.name):
                raise ValueError(f"{where}: a stage needs a name of letters, digits, '.', '_' or '-'")
            if stage.name in names:
                raise ValueError(f"{where}: the name {stage.name!r} is given to two stages")
            if stage.stages or stage.output is not None or stage.push_to_hub:
                raise ValueError(f"{where} ({stage.name}): a stage has no stages, output or push of its own")
            for path in stage.stage_paths():
                if path not in names:
                    raise ValueError(f"{where} ({stage.name}): stage:{path} names no earlier stage "
                                     f"({', '.join(names) or 'none'})")
            names.append(stage.name)
        unknown = [path for path in self.stage_paths() if path not in names] if self.name is None else []
        if unknown:  # a stage's own (named) references are checked by the recipe that holds it, above
            raise ValueError(f"stage:{unknown[0]} names no stage of the recipe ({', '.join(names) or 'none'})")
        return self

    def stage_paths(self) -> list[str]:
        """The stages its models and base name (`stage:NAME` → NAME)."""
        return [spec.path.removeprefix(STAGE) for spec in self.input_specs if spec.path.startswith(STAGE)]

    @model_validator(mode="after")
    def _check_models(self) -> Recipe:
        fill_names(self.models)
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; set `name` for: {', '.join(duplicates)}")
        if self.push_to_hub and not (self.push and self.push.repo_id):
            raise ValueError("push_to_hub = true needs [push] repo_id")
        if self.output_format == "lora" and (self.base is None or self.stages or self.slices):
            raise ValueError("output_format = \"lora\" writes the merge's difference from its [base]: it needs a "
                             "[base], and no stages or slices")
        return self

    @property
    def input_specs(self) -> list[BaseSpec | ModelSpec]:
        """The base (when there is one), then the models: the order of the opened inputs."""
        return [*([self.base] if self.base else []), *self.models]

    @property
    def input_names(self) -> list[str]:
        """`base` and each model's name, in `input_specs` order (what support files and cards say)."""
        return [*(["base"] if self.base else []), *(spec.name for spec in self.models)]

    @property
    def input_labels(self) -> list[str]:
        """How messages name them: `base`, `models.1 (math)`, in `input_specs` order."""
        return [*(["base"] if self.base else []), *(model_label(i, spec) for i, spec in enumerate(self.models))]

    @property
    def head_patterns(self) -> list[str]:
        """The regexes of head tensors for `backbone_only` (the `head` key, else HEAD_PATTERNS)."""
        return self.head if self.head is not None else HEAD_PATTERNS

    @property
    def weights_vary(self) -> bool:
        """Whether some model's weight varies by tensor (a gradient or filtered entries)."""
        return any(varies(spec.weight) for spec in self.models)

    def weights_at(self, tensor: str = "", t: float = 0.0, names: list[str] | None = None) -> list[float]:
        """Each model's weight for one tensor (its name in each model: `names`, else `tensor`), at its
        position `t` among the layers (a filter that matches nothing: the default, 1)."""
        found = []
        for index, spec in enumerate(self.models):
            value = evaluate(spec.weight, names[index] if names else tensor, t)
            found.append(1.0 if value is None else float(value))
        return found

    def weights(self, *, normalize: bool, tensor: str = "", t: float = 0.0) -> list[float]:
        """The models' weights (for one tensor, where they vary), divided by their sum when `normalize`
        (what the card shows)."""
        scaled, divisor = self.average_weights(normalize=normalize, tensor=tensor, t=t)
        return [w / divisor for w in scaled]

    def average_weights(self, *, normalize: bool, tensor: str = "", t: float = 0.0,
                        names: list[str] | None = None) -> tuple[list[float], float]:
        """The weights (for one tensor, where they vary) scaled exactly (`scaled_weights`: to small integers,
        or by a power of two), and what the weighted sum is divided by, once, at the end: their total with
        `normalize`, else the factor that undoes the scaling."""
        scaled, scale = scaled_weights(self.weights_at(tensor, t, names))
        return scaled, (math.fsum(scaled) if normalize else scale)


def scaled_weights(weights: list[float]) -> tuple[list[float], float]:
    """The weights × s, and s: small integers where the weights are ratios of them (0.3 and 0.7 become 3
    and 7, s = 10; equal weights become exactly 1, which the sum needs no multiplication for: a weighted sum
    of bf16 values is then exact in float32, and its one division by s rounds it once, mergecli/exact.py);
    else the weights × 2^-e, the largest of them in [1, 2) (huge or tiny weights neither overflow nor
    underflow), s = 2^-e."""
    exact = common_fraction(weights)
    if exact is not None and any(exact[0]):
        return exact
    exponent = max((math.frexp(w)[1] - 1 for w in weights if w), default=0)
    return [math.ldexp(w, -exponent) for w in weights], math.ldexp(1.0, -exponent)


Recipe.model_rebuild()  # `stages` holds recipes
