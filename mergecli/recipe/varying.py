"""Settings that vary by tensor, as mergekit writes them: a value may be

- a number (or a flag, or a word): every tensor gets it;
- a gradient, a list of numbers spread evenly over the layers: a tensor of layer i of n gets the list
  interpolated linearly at t = i / (n − 1); a tensor outside the layers (embeddings, final norm, head)
  gets t = 0, as mergekit 0.1.5 evaluates it (a list of flags or words is not interpolated: the entry
  at ⌊t · (len − 1)⌋);
- a list of conditional entries, `[{filter = "self_attn", value = [0, 0.5, 1]}, {value = 0.5}]`: the
  first entry whose `filter` is a substring of the tensor's name (no filter, or "*", matches every
  tensor) gives the value, itself a number or a gradient; when none matches, the setting falls back
  to the next place that sets it (a model's own value to the method's table, the table to the default).

`Varying(float, gt=0, le=1)` is the pydantic type of such a setting, each number checked against the
constraints; `evaluate` gives one tensor's value.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

from pydantic import AfterValidator, Field, PlainSerializer, PlainValidator, TypeAdapter, ValidationError

FORMS = "a number, a list of numbers (a gradient over the layers) or a list of {filter, value} entries"


def _scalar_adapter(scalar: type, constraints: tuple) -> TypeAdapter:
    named = dict(constraints)
    check = named.pop("check", None)
    typed = Annotated[scalar, Field(**named)]
    return TypeAdapter(Annotated[typed, AfterValidator(check)] if check else typed)


def _check(adapter: TypeAdapter, value: Any, where: str) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"{where}{message}" if where else message) from None


def _gradient(adapter: TypeAdapter, values: list, where: str) -> list:
    if not values:
        raise ValueError(f"{where}an empty list; expected {FORMS}")
    return [_check(adapter, value, f"{where}entry {index} of the gradient: ") for index, value in enumerate(values)]


def _validator(scalar: type, constraints: tuple):
    adapter = _scalar_adapter(scalar, constraints)

    def validate(value: Any) -> Any:
        if not isinstance(value, list):
            if isinstance(value, dict):
                raise ValueError(f"a table; expected {FORMS}")
            return _check(adapter, value, "")
        if not value or not all(isinstance(entry, dict) for entry in value):
            if any(isinstance(entry, (dict, list)) for entry in value):
                raise ValueError(f"a list that mixes forms; expected {FORMS}")
            return _gradient(adapter, value, "")
        entries = []
        for index, entry in enumerate(value):
            unknown = [key for key in entry if key not in ("filter", "value")]
            if unknown:
                raise ValueError(f"entry {index}: unknown key {unknown[0]!r} (an entry holds a filter and a value)")
            if "value" not in entry:
                raise ValueError(f"entry {index}: no value")
            pattern = entry.get("filter")
            if pattern is not None and not isinstance(pattern, str):
                raise ValueError(f"entry {index}: the filter must be a string (a part of the tensors' names)")
            inner = entry["value"]
            checked = _gradient(adapter, inner, f"entry {index}: ") if isinstance(inner, list) \
                else _check(adapter, inner, f"entry {index}: ")
            entries.append({"filter": pattern, "value": checked} if pattern is not None else {"value": checked})
        return entries

    return validate


def _plain(value: Any) -> Any:
    return value


@cache
def _varying(scalar: type, constraints: tuple) -> Any:
    return Annotated[Any, PlainValidator(_validator(scalar, constraints)), PlainSerializer(_plain)]


def Varying(scalar: type = float, **constraints: Any) -> Any:  # noqa: N802 (a type, named as one)
    """The pydantic type of a setting that may vary by tensor, its numbers of type `scalar` with
    `constraints` (`gt=0, le=1`, `strict=True`, `allow_inf_nan=False`, or `check`: a function that
    returns the number or raises ValueError with the words to say)."""
    return _varying(scalar, tuple(sorted(constraints.items())))


def varies(value: Any) -> bool:
    """Whether a validated setting varies by tensor (a gradient or conditional entries)."""
    return isinstance(value, list)


def _interpolate(values: list, t: float) -> Any:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    fraction = scaled - low
    return (1 - fraction) * values[low] + fraction * values[high]


def evaluate(value: Any, tensor: str, t: float) -> Any:
    """The value a validated setting gives the tensor `tensor` at layer position `t` (0 outside the
    layers); None when it is conditional and no entry's filter matches that tensor."""
    if not isinstance(value, list):
        return value
    if not value or not isinstance(value[0], dict):
        return _interpolate(value, t)
    for entry in value:
        pattern = entry.get("filter")
        if pattern is None or pattern == "*" or (tensor and pattern in tensor):
            return evaluate(entry["value"], tensor, t)
    return None
