"""Moving over from mergekit: a mergekit config (mergekit-yaml's, or mergekit-multi's documents) as a
mergecli recipe, read from the methods' own declarations (their mergekit names, keys and defaults).

- `merge_method` names a method by its mergekit name; `parameters` (the config's, a slice's, a
  model's) go where the method declares their key: its table (`[ties] lambda`), a model's entry
  (`weight`, `density`), or the recipe's top (`normalize`); a value that varies by tensor (gradients,
  `filter` entries) is kept as it is written, and evaluated as mergekit evaluates it.
- `base_model`: the task-vector methods' `[base]`; for `linear`, a model averaged like the others (as
  mergekit does); for `slerp`, the model at t = 0.
- `slices` (and `modules: {default: {slices}}`): `[[slices]]`, each source a model and its layers.
- Several documents (mergekit-multi): `[[stages]]`, the unnamed (else the last) document the final merge.
- `tokenizer` / `tokenizer_source`, its `tokens` and `pad_to_multiple_of`, `chat_template`, `dtype` /
  `out_dtype`: their recipe keys.

The data is then validated as a recipe (recipe/convert.py `check`), each problem said with the
config's key and line. What mergecli does not have is refused by name, never dropped.
"""

from __future__ import annotations

from typing import Any

from mergecli.errors import RecipeError
from mergecli.methods.base import Method
from mergecli.methods.registry import by_mergekit_name, closest, mergekit_names
from mergecli.recipe.convert import Converted, ModelRef, model_ref
from mergecli.recipe.names import default_names
from mergecli.recipe.yaml_reader import Document, Path_

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
CONFIG_KEYS = {"models", "slices", "modules", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "tokenizer", "chat_template", "name"}
MOE_KEYS = {"experts", "gate_mode", "experts_per_token", "shared_experts", "architecture"}
TOP_KEYS = {"normalize"}  # mergekit parameters that are the recipe's own keys
STAGE = "stage:"  # a model path that names an earlier stage


def _words(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Translation:
    """One document's translation into recipe data: the models it names (with their recipe names), and
    where each key came from."""

    def __init__(self, document: Document, stages: set[str]):
        self.document = document
        self.stages = stages  # names of the earlier documents, which models may name
        self.out = Converted({}, document)
        self.models: list[ModelRef] = []  # the recipe's [[models]], in order
        self.names: list[str] = []

    def refuse(self, path: Path_, problem: str) -> RecipeError:
        return self.document.error(path, problem, hint="mergecli has no equivalent of it yet; see the README's "
                                                        "\"Moving from mergekit\"")

    def mapping(self, path: Path_, value: Any, what: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.document.error(path, f"expected {what} (a mapping of keys to values)")
        return value

    def reference(self, path: Path_, value: Any) -> ModelRef:
        reference = model_ref(self.document, path, value)
        if reference.lora and reference.revision:
            raise self.refuse(path, f"{reference.path}@{reference.revision}+{reference.lora}: a LoRA adapter's base "
                                    "at a revision; give the base a local path")
        if reference.path in self.stages:
            return ModelRef(STAGE + reference.path)
        return reference

    def model(self, reference: ModelRef, origin: Path_) -> int:
        """The index of `reference` among the recipe's models, added (and named) the first time."""
        if reference not in self.models:
            index = len(self.models)
            self.models.append(reference)
            self.names = default_names([(model.lora or model.path).removeprefix(STAGE) for model in self.models])
            self.out.put(("models", index, "path"), reference.lora or reference.path, origin)
            if reference.lora:  # `model+lora`: the adapter, applied to its base as it is read (io/adapters.py)
                self.out.put(("models", index, "base"), reference.path, origin)
            if reference.revision:
                self.out.put(("models", index, "revision"), reference.revision, origin)
        for index, name in enumerate(self.names):  # names may grow longer to stay unique
            self.out.data["models"][index]["name"] = name
        return self.models.index(reference)

    def name_of(self, reference: ModelRef, origin: Path_) -> str:
        """The recipe's name for `reference` (added to its models the first time)."""
        index = self.model(reference, origin)  # first: it may rename the models
        return self.names[index]


def translate(document: Document, *, stages: set[str] = frozenset()) -> Converted:
    """The recipe data of one mergekit config document (`stages`: the names of earlier documents it may
    use as models); not yet validated (see recipe/convert.py `check`).

    Raises:
        RecipeError: a feature mergecli does not have, named; or a config that is not mergekit's.
    """
    job = Translation(document, set(stages))
    config = document.data
    if not isinstance(config, dict):
        raise document.error((), "not a mergekit config (a mapping with merge_method and models)")
    moe = [key for key in config if key in MOE_KEYS]
    if moe:
        raise job.refuse((moe[0],), "a mergekit-moe config: run it with `mergecli moe`")
    unknown = [key for key in config if key not in CONFIG_KEYS]
    if unknown:
        raise document.error((unknown[0],), f"mergekit has no key {unknown[0]!r}")
    method = _method(job, config)
    out = job.out
    out.put(("method",), method.name, ("merge_method",))
    dtype = config.get("out_dtype", config.get("dtype"))
    if dtype is not None:
        key = "out_dtype" if "out_dtype" in config else "dtype"
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise document.error((key,), f"{_words(dtype)} is not a dtype mergecli writes (float32, float16, bfloat16)")
        out.put(("dtype",), DTYPES[dtype], (key,))
    base = job.reference(("base_model",), config["base_model"]) if config.get("base_model") is not None else None
    forms = [key for key in ("models", "slices", "modules") if key in config]
    if len(forms) != 1:
        raise document.error((forms[1],) if forms else ("models",), "a config gives exactly one of models, slices "
                                                                    "and modules" if forms else
                             "missing: the config lists no models")
    parameters, where = config.get("parameters"), ("parameters",)
    slices = None
    if forms[0] == "modules":
        module, slices, models = _module(job, config)
        parameters = {**job.mapping(where, parameters, "parameters"),
                      **job.mapping((*module, "parameters"), config["modules"][module[-1]].get("parameters"),
                                    "parameters")}
    elif forms[0] == "slices":
        slices = ("slices",)
    else:
        models = ("models",)
    table, top, each = _parameters(job, method, where, parameters, shared=True)
    for key, (value, origin) in top.items():
        out.put((key,), value, origin)
    out.put((method.name,), {}, ("merge_method",))
    for key, value in method.mergekit_defaults.items():
        out.put((method.name, key), value, ("merge_method",))
    for key, (value, origin) in table.items():
        out.put((method.name, key), value, origin)
    if slices is None:
        base = _models(job, method, models, base, each)
    else:
        base = _slices(job, method, slices, base, each)
    if base is not None:
        out.put(("base", "path"), base.path, ("base_model",))
        if base.revision:
            out.put(("base", "revision"), base.revision, ("base_model",))
    _tokenizer(job, config, base)
    if config.get("chat_template") is not None:
        out.put(("chat_template",), config["chat_template"], ("chat_template",))
    return out


def _method(job: Translation, config: dict) -> Method:
    name = config.get("merge_method")
    if not isinstance(name, str):
        raise job.document.error(("merge_method",), "expected the name of a merge method" if name is not None
                                 else "missing: the config names no merge_method")
    method = by_mergekit_name(name)
    if method is None:
        close = closest(name, mergekit_names())
        guess = f"; did you mean {close!r}?" if close else ""
        raise job.refuse(("merge_method",), f"{name!r} is not a method of mergecli{guess} (it has "
                                            f"{', '.join(mergekit_names())})")
    return method


def _module(job: Translation, config: dict) -> tuple[Path_, Path_ | None, Path_ | None]:
    """mergekit's `modules: {NAME: {slices | models, parameters}}` form, for a model of one module."""
    modules = job.mapping(("modules",), config["modules"], "modules")
    if len(modules) != 1:
        raise job.refuse(("modules",), f"{len(modules)} modules (a model of several parts, such as a vision tower "
                                       "beside its language model)")
    name = next(iter(modules))
    module = job.mapping(("modules", name), modules[name], "the module")
    unknown = [key for key in module if key not in ("slices", "models", "parameters")]
    if unknown:
        raise job.document.error(("modules", name, unknown[0]), "unknown key of a module (slices, models, parameters)")
    if ("slices" in module) == ("models" in module):
        raise job.document.error(("modules", name), "a module gives exactly one of slices and models")
    return (("modules", name), ("modules", name, "slices") if "slices" in module else None,
            ("modules", name, "models") if "models" in module else None)


def _entries(job: Translation, path: Path_, what: str) -> list:
    node: Any = job.document.data
    for part in path:
        node = node[part]
    if not isinstance(node, list) or not node:
        raise job.document.error(path, f"expected a list of {what}")
    return node


def _models(job: Translation, method: Method, path: Path_, base: ModelRef | None,
            each: dict) -> ModelRef | None:
    """The `models:` form: each model's entry, with the config's per-model keys where it sets none.
    Returns the recipe's base: where mergekit's `base_model` goes depends on the method (see the
    module's docstring)."""
    listed = []
    for index, entry in enumerate(_entries(job, path, "models, each `- model: PATH`")):
        where = (*path, index)
        if isinstance(entry, dict):
            unknown = [key for key in entry if key not in ("model", "parameters")]
            if unknown:
                raise job.document.error((*where, unknown[0]), "unknown key of a model entry (model, parameters)")
            reference = job.reference((*where, "model"), entry.get("model"))
            own = _parameters(job, method, (*where, "parameters"), entry.get("parameters"), shared=False)[2]
        else:
            reference, own = job.reference(where, entry), {}
        listed.append((where, reference, own))
    references = [reference for _, reference, _ in listed]
    if base is None or method.name == "passthrough":
        pass
    elif method.name == "average":  # mergekit's linear averages its base like any input, with a weight
        if base not in references and "weight" not in each:
            raise job.document.error(("base_model",), "linear: the base_model is not among the models and has no "
                                                      "weight; mergekit refuses this config (it averages its base "
                                                      "like any model)")
        if base not in references:
            listed.append((("base_model",), base, {}))
    elif method.name == "slerp":  # the base is t = 0: the first model
        listed.sort(key=lambda item: item[1] != base)
        if base not in references:
            listed.insert(0, (("base_model",), base, {}))
    else:
        listed = [item for item in listed if item[1] != base]  # the task vectors' base, never merged
    for where, reference, own in listed:
        index = job.model(reference, where)
        for key, (value, origin) in {**each, **own}.items():
            job.out.put(("models", index, key), value, origin)
    return None if method.name in ("average", "slerp", "passthrough") else base


def _slices(job: Translation, method: Method, path: Path_, base: ModelRef | None,
            each: dict) -> ModelRef | None:
    """`slices:`: each output slice's sources (a model and its `layer_range`), with their keys and the
    slice's own parameters. A source that is the task vectors' base is `model = "base"`."""
    keeps_base = method.name not in ("average", "slerp", "passthrough")
    for number, entry in enumerate(_entries(job, path, "slices, each with its sources")):
        where = (*path, number)
        entry = job.mapping(where, entry, "a slice")
        unknown = [key for key in entry if key not in ("sources", "parameters")]
        if unknown:
            raise (job.refuse((*where, unknown[0]), f"a slice's own {unknown[0]} is not supported")
                   if unknown[0] in ("base_model", "residual_weight")
                   else job.document.error((*where, unknown[0]), "unknown key of a slice (sources, parameters)"))
        table, _, slice_each = _parameters(job, method, (*where, "parameters"), entry.get("parameters"), shared=True)
        sources = _entries(job, (*where, "sources"), "sources, each `- model: PATH` with its `layer_range`")
        if method.name == "slerp" and base is not None:  # the base is t = 0: the first source
            sources = sorted(sources, key=lambda source: not (isinstance(source, dict) and base ==
                                                              job.reference((), source.get("model"))))
        for index, source in enumerate(sources):
            at = (*where, "sources", index)
            source = job.mapping(at, source, "a source")
            unknown = [key for key in source if key not in ("model", "layer_range", "parameters")]
            if unknown:
                raise job.document.error((*at, unknown[0]), "unknown key of a slice's source (model, layer_range, "
                                                            "parameters)")
            reference = job.reference((*at, "model"), source.get("model"))
            own = _parameters(job, method, (*at, "parameters"), source.get("parameters"), shared=False)[2]
            name = "base" if keeps_base and reference == base else job.name_of(reference, (*at, "model"))
            slot = ("slices", number, "sources", index)
            job.out.put((*slot, "model"), name, (*at, "model"))
            job.out.put((*slot, "layers"), source.get("layer_range"), (*at, "layer_range"))
            for key, (value, origin) in {**each, **slice_each, **own}.items():
                job.out.put((*slot, key), value, origin)
        for key, (value, origin) in table.items():
            job.out.put(("slices", number, method.name, key), value, origin)
    return base if keeps_base else None


def _parameters(job: Translation, method: Method, path: Path_, parameters: Any, *,
                shared: bool) -> tuple[dict[str, tuple], dict[str, tuple], dict[str, tuple]]:
    """mergekit parameters as (the method table's keys, the recipe's top keys, every model's keys), each
    as (value, where in the config). A setting of the whole merge given in a model's parameters
    (`shared` false) is ignored by mergekit, so it is here too, with a note."""
    parameters = job.mapping(path, parameters, "parameters")
    table_keys = _keys(method.settings)
    model_keys = {"weight", *_keys(method.model_settings)}
    table, top, each = {}, {}, {}
    for key, value in parameters.items():
        where = (*path, key)
        if value is None:
            raise job.document.error(where, "null is not a value (leave the key out to take its default)")
        if isinstance(value, dict):
            value = [value]  # one {filter, value} entry
        if key in method.mergekit_ignored:
            continue
        if key in TOP_KEYS and method.name not in ("slerp", "passthrough"):
            target = top if shared else None
        elif key in model_keys:
            target = (table if key in table_keys else each) if shared else each
        elif key in table_keys:
            target = table if shared else None
        else:
            raise job.refuse(where, f"mergekit's {key!r} has no equivalent in mergecli's {method.name} (its keys: "
                                    f"{', '.join(sorted(table_keys | model_keys | TOP_KEYS))})")
        if target is None:
            job.out.notes.append(f"{job.document.where(where)}: ignored, as mergekit ignores it: a model's {key!r} "
                                 "is one setting for the whole merge")
            continue
        target[key] = (value, where)
    return table, top, each


def _keys(settings: type | None) -> set[str]:
    """The keys a settings table declares, by the names a recipe (and mergekit) writes them."""
    if settings is None:
        return set()
    return {field.alias or name for name, field in settings.model_fields.items()}


TOKEN_KINDS = ("model_token", "zero")


def _tokenizer(job: Translation, config: dict, base: ModelRef | None) -> None:
    """mergekit's `tokenizer_source`, or its `tokenizer:` table (`source` "union" by default, `tokens`,
    `pad_to_multiple_of`): the recipe's `tokenizer`, `pad_to_multiple_of` and `[tokens]`."""
    if config.get("tokenizer") is not None and config.get("tokenizer_source") is not None:
        raise job.document.error(("tokenizer",), "a config gives tokenizer or tokenizer_source, not both")
    settings = job.mapping(("tokenizer",), config.get("tokenizer"), "the tokenizer's settings")
    unknown = [key for key in settings if key not in ("source", "tokens", "pad_to_multiple_of")]
    if unknown:
        raise job.document.error(("tokenizer", unknown[0]), "unknown key of the tokenizer (source, tokens, "
                                                            "pad_to_multiple_of)")
    if "tokenizer" in config:
        where, chosen = ("tokenizer", "source"), settings.get("source", "union")
    else:
        where, chosen = ("tokenizer_source",), config.get("tokenizer_source")
    if "pad_to_multiple_of" in settings:
        job.out.put(("pad_to_multiple_of",), settings["pad_to_multiple_of"], ("tokenizer", "pad_to_multiple_of"))
    if chosen is not None:
        job.out.put(("tokenizer",), _token_model(job, where, chosen, base, words=("base", "union")), where)
    tokens = job.mapping(("tokenizer", "tokens"), settings.get("tokens"), "tokens")
    for token, entry in tokens.items():
        at = ("tokenizer", "tokens", token)
        entry = job.mapping(at, entry, "a token's source and force")
        unknown = [key for key in entry if key not in ("source", "force")]
        if unknown:
            raise job.document.error((*at, unknown[0]), "unknown key of a token (source, force)")
        if "source" in entry:
            job.out.put(("tokens", token, "source"), _token_source(job, (*at, "source"), entry["source"], base),
                        (*at, "source"))
        if "force" in entry:
            job.out.put(("tokens", token, "force"), entry["force"], (*at, "force"))
        if not entry:
            job.out.put(("tokens", token), {}, at)


def _token_model(job: Translation, where: Path_, value: Any, base: ModelRef | None, *, words: tuple) -> str:
    """A model a tokenizer setting names: its recipe name, "base", or (a model the merge does not read)
    its path; `words` are the values kept as they are."""
    if isinstance(value, str) and value in words:
        return value
    reference = job.reference(where, value)
    if base is not None and reference == base:
        return "base"
    if reference in job.models:
        return job.names[job.models.index(reference)]
    return reference.path  # a model not merged: its tokenizer is the output's


def _token_source(job: Translation, where: Path_, value: Any, base: ModelRef | None) -> Any:
    """A token's embedding source: a model (its name), `{kind: zero}`, or `{kind: model_token, model,
    token | token_id}`."""
    if isinstance(value, dict) and "kind" in value:
        kind = value["kind"]
        if kind not in TOKEN_KINDS:
            raise job.document.error((*where, "kind"), f"{_words(kind)} is not a kind of token source "
                                                      "(model_token, zero)")
        if kind == "zero":
            return "zero"
        found = {"model": _token_model(job, (*where, "model"), value.get("model"), base, words=())}
        for key in ("token", "token_id"):
            if value.get(key) is not None:
                found[key] = value[key]
        return found
    return _token_model(job, where, value, base, words=())
