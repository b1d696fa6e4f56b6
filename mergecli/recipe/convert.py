"""Moving over from mergekit: a mergekit YAML config of the methods mergecli has, as a mergecli recipe.

`models`, `base_model`, `merge_method`, global and per-model `parameters`, `dtype` / `out_dtype` and
`tokenizer_source` are translated. What mergecli does not have (`slices`, per-layer gradients,
`filter`ed parameters, LoRA `+` suffixes, other methods) is refused by name: never dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergecli.errors import RecipeError
from mergecli.recipe.dump import toml_value

METHODS = {"linear": "average", "task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare_linear",
           "dare_ties": "dare_ties", "slerp": "slerp"}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
# The method table's keys that each method reads, by mergekit's name (the same here), and mergekit's
# defaults where they differ from mergecli's (mergekit keeps every entry unless told a density).
TABLE_KEYS = {"average": set(), "task_arithmetic": {"lambda"}, "ties": {"lambda", "density"},
              "dare_linear": {"lambda", "density"}, "dare_ties": {"lambda", "density"}, "slerp": {"t"}}
MERGEKIT_DEFAULTS = {"ties": {"density": 1.0}, "dare_linear": {"density": 1.0}, "dare_ties": {"density": 1.0}}
TOP_KEYS = {"normalize": "normalize"}
NO_OPS = {"int8_mask"}  # how mergekit holds its masks in memory: no effect on the result


def _refuse(source: str, problem: str) -> RecipeError:
    return RecipeError(source, [problem], hint="mergecli merges whole models with one setting per tensor; "
                                               "these features have no equivalent yet")


def _scalar(source: str, where: str, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        kind = "a filtered value" if isinstance(value, dict) else "a per-layer gradient"
        raise _refuse(source, f"{where}: {kind} ({value!r}) has no equivalent in mergecli (one value for every tensor)")
    return value


def _model_path(source: str, entry: Any) -> str:
    path = entry.get("model") if isinstance(entry, dict) else entry
    if isinstance(path, dict):  # mergekit's {model: ..., lora: ...} form
        path = path.get("model")
    if not isinstance(path, str) or not path:
        raise RecipeError(source, [f"models: an entry without a model path: {entry!r}"])
    if "+" in path:
        raise _refuse(source, f"models: {path}: a LoRA adapter applied on the fly ('+') is not supported; "
                              "merge the adapter into its model first")
    return path


def convert_mergekit(config: dict, *, source: str = "mergekit config") -> str:
    """The mergecli recipe (TOML) of a mergekit config (already parsed from YAML).

    Raises:
        RecipeError: a feature mergecli does not have, named; or a config that is not mergekit's.
    """
    if not isinstance(config, dict):
        raise RecipeError(source, ["not a mergekit config (a mapping)"])
    for feature in ("slices", "modules"):
        if feature in config:
            raise _refuse(source, f"{feature}: layer slices (frankenmerges) are not supported: mergecli merges "
                                  "models of one architecture, tensor by tensor")
    merge_method = config.get("merge_method")
    method = METHODS.get(merge_method)
    if method is None:
        raise _refuse(source, f"merge_method: {merge_method!r} is not a method of mergecli "
                              f"(it has {', '.join(METHODS)})")
    known = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "name"}
    unknown = [key for key in config if key not in known]
    if unknown:
        raise _refuse(source, f"{unknown[0]}: mergekit's {unknown[0]!r} has no equivalent in mergecli")
    base = config.get("base_model")
    base_path = _model_path(source, base) if base is not None else None
    entries = [(_model_path(source, entry), (entry.get("parameters") or {}) if isinstance(entry, dict) else {})
               for entry in config.get("models") or []]
    if method == "slerp":  # mergekit's base is t = 0: mergecli's first model, and slerp reads no base
        entries = sorted(entries, key=lambda item: item[0] != base_path)
        if base_path and base_path not in [path for path, _ in entries]:
            entries.insert(0, (base_path, {}))
        base_path = None
    else:
        entries = [(path, parameters) for path, parameters in entries if path != base_path]
    lines = [f"# converted from {source} by `mergecli convert`", f"method = {toml_value(method)}"]
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None:
        if dtype not in DTYPES:
            raise _refuse(source, f"dtype: {dtype!r} (mergecli writes float32, float16 or bfloat16)")
        lines.append(f"dtype = {toml_value(DTYPES[dtype])}")
    tokenizer, padding, named = _tokenizer(source, config, base_path, [path for path, _ in entries])
    if tokenizer is not None:
        lines.append(f"tokenizer = {toml_value(tokenizer)}")
    if padding is not None:
        lines.append(f"pad_to_multiple_of = {toml_value(padding)}")
    table, top = _parameters(source, "parameters", config.get("parameters") or {}, method)
    weight = table.pop("weight", None)  # mergekit's global weight: every model's that says none
    table = {**MERGEKIT_DEFAULTS.get(method, {}), **table}
    lines += [f"{key} = {toml_value(value)}" for key, value in top.items()]
    if base_path is not None:
        lines += ["", "[base]", f"path = {toml_value(base_path)}"]
    if table or method != "average":
        lines += ["", f"[{method}]", *(f"{key} = {toml_value(value)}" for key, value in table.items())]
        if method.startswith("dare"):
            lines.append("# mergekit rescales DARE's survivors to keep each task vector's L1 norm; mergecli "
                         "rescales them by 1/density, as the paper does")
    for path, parameters in entries:
        own, own_top = _parameters(source, f"models ({path}).parameters", parameters, method)
        whole = [*own_top, *(key for key in own if key not in ("weight", "density"))]
        if whole:
            raise _refuse(source, f"models ({path}).parameters: {whole[0]} is one setting for the whole merge in "
                                  "mergecli, not a model's")
        if weight is not None and "weight" not in own:
            own["weight"] = weight
        if method == "slerp":
            own.pop("weight", None)
        lines += ["", "[[models]]", f"path = {toml_value(path)}"]
        if path == named:  # the model whose tokenizer is the output's
            lines.append(f"name = {toml_value(tokenizer)}")
        lines += [f"{key} = {toml_value(value)}" for key, value in own.items()]
    return "\n".join(lines) + "\n"


def _tokenizer(source: str, config: dict, base: str | None,
               models: list[str]) -> tuple[str | None, int | None, str | None]:
    """(the recipe's `tokenizer`, its `pad_to_multiple_of`, the path of the model it names) of mergekit's
    `tokenizer_source` or `tokenizer: {source, pad_to_multiple_of}`."""
    settings = config.get("tokenizer") or {}
    if not isinstance(settings, dict) or any(key not in ("source", "pad_to_multiple_of") for key in settings):
        raise _refuse(source, "tokenizer: only its `source` and `pad_to_multiple_of` have an equivalent in mergecli")
    chosen = settings.get("source", config.get("tokenizer_source"))
    padding = settings.get("pad_to_multiple_of")
    if chosen in (None, "base") or (base is not None and chosen == base):
        return None, padding, None
    if chosen == "union":
        return "union", padding, None
    if chosen in models:
        return Path(chosen).name or chosen, padding, chosen
    raise _refuse(source, f"tokenizer source {chosen!r}: mergecli's output vocabulary is the base's, the union, or "
                          "a model of the merge's")


def _parameters(source: str, where: str, parameters: Any, method: str) -> tuple[dict, dict]:
    """(the method table's / a model entry's keys, the recipe's top-level keys) of mergekit parameters."""
    if not isinstance(parameters, dict):
        raise RecipeError(source, [f"{where}: expected a mapping of parameters"])
    table, top = {}, {}
    for key, value in parameters.items():
        value = _scalar(source, f"{where}.{key}", value)
        if key in NO_OPS:
            continue
        if key == "weight":
            table["weight"] = value
        elif key in TOP_KEYS:
            top[TOP_KEYS[key]] = value
        elif key == "rescale" and method.startswith("dare"):
            if value is not True:
                raise _refuse(source, f"{where}.rescale: DARE without rescaling is not supported")
        elif key in TABLE_KEYS[method]:
            table[key] = value
        else:
            raise _refuse(source, f"{where}.{key}: mergekit's {key!r} has no equivalent in mergecli's {method}")
    return table, top


def load_mergekit(path: Path) -> dict:
    """A mergekit YAML config, parsed safely.

    Raises:
        RecipeError: unreadable, or not YAML.
    """
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(str(path), ["no such file"]) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise RecipeError(str(path), [f"not a readable YAML file ({str(exc).splitlines()[0][:200]})"]) from None
