"""Moving over from mergekit: a mergekit YAML config of the methods mergecli has, as a mergecli recipe.

The YAML is read strictly (recipe/yaml_reader.py), translated into recipe data, and that data is
validated by the same schema as a TOML recipe before anything is printed or run: a problem is said
in one line naming the config's key and its line. `models`, `base_model`, `merge_method`, global and
per-model `parameters`, `dtype` / `out_dtype` and `tokenizer_source` / `tokenizer` are translated.
What mergecli does not have is refused by name, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecli.errors import RecipeError
from mergecli.recipe.dump import dump_data
from mergecli.recipe.load import recipe_from_data
from mergecli.recipe.schema import Recipe
from mergecli.recipe.yaml_reader import Document, Path_, load_documents

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
CONFIG_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "tokenizer", "name", "slices", "modules", "chat_template"}
HINT = "mergecli merges whole models with one setting per tensor; these features have no equivalent yet"


@dataclass
class Converted:
    """A config translated: the recipe's data, and where in the config each recipe key came from."""

    data: dict[str, Any]
    document: Document
    origins: dict[Path_, Path_] = field(default_factory=dict)  # recipe key path → config key path

    def put(self, path: Path_, value: Any, origin: Path_) -> None:
        """Set the recipe key at `path` (tables and list items made as needed) from the config's `origin`."""
        node = self.data
        for part, following in zip(path[:-1], path[1:]):
            if isinstance(part, int):
                while len(node) <= part:
                    node.append({})
                node = node[part]
            else:
                node = node.setdefault(part, [] if isinstance(following, int) else {})
        node[path[-1]] = value
        self.origins[path] = origin

    def config_key(self, recipe_key: str) -> str:
        """The config's place for a problem with `recipe_key` (`models.1.weight`), with its line."""
        path = tuple(int(part) if part.isdigit() else part for part in recipe_key.split("."))
        while path and path not in self.origins:
            path = path[:-1]
        return self.document.where(self.origins[path]) if path else recipe_key

    def locate(self, problem: str) -> str:
        """A recipe problem (`models.1.weight: ...`) said with the config's key and line instead."""
        key, sep, words = problem.partition(": ")
        return f"{self.config_key(key)}: {words}" if sep and " " not in key else problem


@dataclass(frozen=True)
class ModelRef:
    """A model in a config: its path, revision, and a LoRA adapter applied to it (`model+lora`)."""

    path: str
    revision: str | None = None
    lora: str | None = None


def _refuse(document: Document, path: Path_, problem: str) -> RecipeError:
    return document.error(path, problem, hint=HINT)


def model_ref(document: Document, path: Path_, value: Any) -> ModelRef:
    """mergekit's model reference: `path[@revision][+lora[@revision]]`, or `{model: ..., lora: ...}`."""
    if isinstance(value, dict):
        unknown = [key for key in value if key not in ("model", "lora", "override_architecture")]
        if unknown:
            raise document.error((*path, unknown[0]), "unknown key of a model reference (model, lora)")
        if value.get("override_architecture") is not None:
            raise _refuse(document, (*path, "override_architecture"), "overriding a model's architecture is not "
                                                                      "supported")
        inner = model_ref(document, (*path, "model"), value.get("model"))
        if value.get("lora") is not None:
            return ModelRef(inner.path, inner.revision, model_ref(document, (*path, "lora"), value["lora"]).path)
        return inner
    if not isinstance(value, str) or not value.strip():
        raise document.error(path, "expected a model: a path or a hub repo id")
    model, _, lora = value.partition("+")
    name, at, revision = model.partition("@")
    if not name or (at and not revision) or "+" in lora or model.count("@") > 1:
        raise document.error(path, f"cannot read the model reference {value!r} (PATH[@REVISION][+LORA])")
    return ModelRef(name, revision or None, lora or None)


def _model_path(document: Document, path: Path_, value: Any) -> ModelRef:
    reference = model_ref(document, path, value)
    if reference.lora:
        raise _refuse(document, path, f"{reference.path}+{reference.lora}: a LoRA adapter applied on the fly ('+') "
                                      "is not supported; merge the adapter into its model first")
    return reference


def _mapping(document: Document, path: Path_, value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise document.error(path, f"expected {what} (a mapping of keys to values)")
    return value


def _scalar(document: Document, path: Path_, value: Any) -> Any:
    if isinstance(value, (list, dict)):
        kind = "a filtered value" if isinstance(value, dict) or any(isinstance(v, dict) for v in value) \
            else "a per-layer gradient"
        raise _refuse(document, path, f"{kind} ({_short(value)}) has no equivalent in mergecli (one value for "
                                      "every tensor)")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def convert_document(document: Document) -> Converted:
    """The recipe data of one mergekit config document (not yet validated: see `check`).

    Raises:
        RecipeError: a feature mergecli does not have, named; or a config that is not mergekit's.
    """
    config = document.data
    if not isinstance(config, dict):
        raise document.error((), "not a mergekit config (a mapping with merge_method and models)")
    unknown = [key for key in config if key not in CONFIG_KEYS]
    if unknown:
        raise _refuse(document, (unknown[0],), f"mergekit has no key {unknown[0]!r}"
                      if unknown[0] not in ("experts", "gate_mode", "base_model_dtype") else
                      "a mergekit-moe config: `mergecli convert` reads mergekit-yaml configs")
    for feature in ("slices", "modules"):
        if feature in config:
            raise _refuse(document, (feature,), "layer slices (frankenmerges) are not supported: mergecli merges "
                                                "models of one architecture, tensor by tensor")
    if "chat_template" in config:
        raise _refuse(document, ("chat_template",), "setting a chat template is not supported")
    merge_method = config.get("merge_method")
    if not isinstance(merge_method, str):
        raise document.error(("merge_method",), "expected the name of a merge method" if merge_method is not None
                             else "missing: the config names no merge_method")
    method = METHODS.get(merge_method)
    if method is None:
        raise _refuse(document, ("merge_method",), f"{merge_method!r} is not a method of mergecli "
                                                   f"(it has {', '.join(METHODS)})")
    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise document.error(("models",), "expected a list of models, each `- model: PATH`" if "models" in config
                             else "missing: the config lists no models")
    out = Converted({"method": method}, document, {("method",): ("merge_method",)})
    dtype = config.get("out_dtype", config.get("dtype"))
    if dtype is not None:
        key = "out_dtype" if "out_dtype" in config else "dtype"
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise document.error((key,), f"{_short(dtype)} is not a dtype mergecli writes (float32, float16, bfloat16)")
        out.put(("dtype",), DTYPES[dtype], (key,))
    base = _model_path(document, ("base_model",), config["base_model"]) if config.get("base_model") is not None \
        else None
    entries = []
    for index, entry in enumerate(models):
        where = ("models", index)
        if isinstance(entry, dict):
            unknown = [key for key in entry if key not in ("model", "parameters")]
            if unknown:
                raise document.error((*where, unknown[0]), "unknown key of a model entry (model, parameters)")
            reference = _model_path(document, (*where, "model"), entry.get("model"))
            parameters = _mapping(document, (*where, "parameters"), entry.get("parameters"), "the model's parameters")
        else:
            reference, parameters = _model_path(document, where, entry), {}
        entries.append((where, reference, parameters))
    if method == "slerp":  # mergekit's base is t = 0: mergecli's first model, and slerp reads no base
        entries.sort(key=lambda item: item[1].path != (base.path if base else None))
        if base and base.path not in [reference.path for _, reference, _ in entries]:
            entries.insert(0, (("base_model",), base, {}))
        base = None
    else:
        entries = [item for item in entries if base is None or item[1].path != base.path]
    tokenizer, padding, named = _tokenizer(document, config, base, [reference for _, reference, _ in entries])
    if tokenizer is not None:
        out.put(("tokenizer",), tokenizer, ("tokenizer",) if "tokenizer" in config else ("tokenizer_source",))
    if padding is not None:
        out.put(("pad_to_multiple_of",), padding, ("tokenizer", "pad_to_multiple_of"))
    table, top = _parameters(document, ("parameters",), config.get("parameters"), method)
    weight = table.pop("weight", None)  # mergekit's global weight: every model's that says none
    for key, (value, origin) in top.items():
        out.put((key,), value, origin)
    if base is not None:
        _put_model(out, ("base",), base, ("base_model",))
    if table or method != "average":
        out.put((method,), {}, ("merge_method",))
        for key, value in MERGEKIT_DEFAULTS.get(method, {}).items():
            out.put((method, key), value, ("merge_method",))
        for key, (value, origin) in table.items():
            out.put((method, key), value, origin)
    for index, (where, reference, parameters) in enumerate(entries):
        own, own_top = _parameters(document, (*where, "parameters"), parameters, method)
        whole = [*own_top, *(key for key in own if key not in ("weight", "density"))]
        if whole:
            raise _refuse(document, (*where, "parameters", whole[0]), "one setting for the whole merge in mergecli, "
                                                                      "not a model's")
        if weight is not None and "weight" not in own:
            own["weight"] = weight
        if method == "slerp":
            own.pop("weight", None)
        _put_model(out, ("models", index), reference, where if where[0] == "models" else where)
        if reference == named:  # the model whose tokenizer is the output's
            out.put(("models", index, "name"), tokenizer, ("tokenizer",))
        for key, (value, origin) in own.items():
            out.put(("models", index, key), value, origin)
    return out


def _put_model(out: Converted, path: Path_, reference: ModelRef, origin: Path_) -> None:
    out.put((*path, "path"), reference.path, origin)
    if reference.revision:
        out.put((*path, "revision"), reference.revision, origin)


def _tokenizer(document: Document, config: dict, base: ModelRef | None,
               models: list[ModelRef]) -> tuple[str | None, Any, ModelRef | None]:
    """(the recipe's `tokenizer`, its `pad_to_multiple_of`, the model it names) of mergekit's
    `tokenizer_source` or `tokenizer: {source, pad_to_multiple_of}`."""
    settings = _mapping(document, ("tokenizer",), config.get("tokenizer"), "the tokenizer's settings")
    extra = [key for key in settings if key not in ("source", "pad_to_multiple_of")]
    if extra:
        raise _refuse(document, ("tokenizer", extra[0]), "only the tokenizer's `source` and `pad_to_multiple_of` have "
                                                         "an equivalent in mergecli")
    where = ("tokenizer", "source") if "source" in settings else ("tokenizer_source",)
    chosen = settings.get("source", config.get("tokenizer_source"))
    padding = settings.get("pad_to_multiple_of")
    if chosen in (None, "base"):
        return None, padding, None
    if chosen == "union":
        return "union", padding, None
    reference = model_ref(document, where, chosen)
    if base is not None and reference == base:
        return None, padding, None
    if reference in models:
        return re.sub(r"[^A-Za-z0-9._-]", "-", Path(reference.path).name or reference.path), padding, reference
    raise _refuse(document, where, f"{_short(chosen)}: mergecli's output vocabulary is the base's, the union, or a "
                                   "model of the merge's")


def _parameters(document: Document, path: Path_, parameters: Any,
                method: str) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(the method table's / a model entry's keys, the recipe's top-level keys) of mergekit parameters,
    each as (value, where in the config)."""
    parameters = _mapping(document, path, parameters, "parameters")
    table, top = {}, {}
    for key, value in parameters.items():
        where = (*path, key)
        value = _scalar(document, where, value)
        if key in NO_OPS:
            continue
        if key == "weight":
            table["weight"] = (value, where)
        elif key in TOP_KEYS:
            top[TOP_KEYS[key]] = (value, where)
        elif key == "rescale" and method.startswith("dare"):
            if value is not True:
                raise _refuse(document, where, "DARE without rescaling is not supported")
        elif key in TABLE_KEYS[method]:
            table[key] = (value, where)
        else:
            raise _refuse(document, where, f"mergekit's {key!r} has no equivalent in mergecli's {method}")
    return table, top


def check(converted: Converted, *, base_dir: Path, overrides: list[str] = ()) -> Recipe:
    """The converted data validated as a recipe, with paths resolved against `base_dir` (mergekit reads
    them from the current directory); a problem is said with the config's key and line, and so are
    the problems of the method's own keys, found when the recipe is bound to its method.

    Raises:
        RecipeError: one line per problem, naming the config's key and line.
    """
    source = converted.document.source
    try:
        recipe = recipe_from_data(_copy(converted.data), source=source, base_dir=base_dir, overrides=overrides)
    except RecipeError as exc:
        raise RecipeError(source, [converted.locate(problem) for problem in exc.problems], hint=exc.hint) from None
    recipe.locate_with(converted.locate)
    return recipe


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def read_config(path: Path) -> Converted:
    """A mergekit config file, read strictly and converted.

    Raises:
        RecipeError: unreadable, not YAML, several documents, or not a config mergecli can run.
    """
    documents = load_documents(path)
    if len(documents) != 1:
        raise RecipeError(str(path), [f"holds {len(documents)} YAML documents; several stages in one file are not "
                                      "supported" if documents else "holds no YAML document"])
    return convert_document(documents[0])


def recipe_text(converted: Converted, *, source: str) -> str:
    """The recipe as TOML, with a line saying where it came from."""
    return f"# converted from {source} by `mergecli convert`\n" + dump_data(converted.data)
