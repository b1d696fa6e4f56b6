"""The model card (README.md) written into every output: what the hub shows on the model page.

YAML front matter (the hub's metadata: `base_model` with the inputs' hub ids and
`base_model_relation: merge`, so the model tree links the merge to its parents; `tags`,
`library_name`, `pipeline_tag`), then a page meant for people: what was merged with what weights,
how, how to load it, and the exact recipe that reproduces it.
"""

from __future__ import annotations

import json

from mergecli import __version__
from mergecli.io.files import USAGE_PLACEHOLDER
from mergecli.io.hub import looks_like_repo_id
from mergecli.methods.base import Method
from mergecli.recipe import BaseSpec, ModelSpec, Recipe, dump_recipe

HUB_URL = "https://huggingface.co"
MERGECLI_URL = "https://pypi.org/project/mergecli/"

_PIPELINES = {  # architecture suffix -> the hub's pipeline tag
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForImageClassification": "image-classification",
}
_LOADERS = {  # pipeline tag -> transformers Auto class
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
}


def pipeline_tag(config: dict | None) -> str | None:
    """The hub pipeline tag that the config's architecture implies (None if it implies none)."""
    for architecture in (config or {}).get("architectures") or []:
        for suffix, tag in _PIPELINES.items():
            if str(architecture).endswith(suffix):
                return tag
    return None


def loader_class(config: dict | None) -> str:
    """The transformers Auto class that loads a model of this config (`AutoModelForCausalLM`)."""
    return _LOADERS.get(pipeline_tag(config) or "", "AutoModel")


def hub_ids(recipe: Recipe) -> list[str]:
    """Hub repo ids among the base and the models (a local copy's declared `hub_id`), in recipe order,
    without duplicates."""
    ids = [spec.hub_id or spec.path for spec in recipe.input_specs]
    return list(dict.fromkeys(repo for repo in ids if looks_like_repo_id(repo)))


def _yaml(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar: no value can break the front matter.
    return json.dumps(value, ensure_ascii=False)


def front_matter(recipe: Recipe, config: dict | None, license: str | None = None, *,
                 sentence_transformers: bool = False) -> str:
    """The YAML metadata block, `---` lines included."""
    lines = ["---", *([f"license: {_yaml(license)}"] if license else [])]
    parents = hub_ids(recipe)
    if parents:
        lines.append("base_model:")
        lines.extend(f"- {_yaml(repo)}" for repo in parents)
        lines.append("base_model_relation: merge")
    if sentence_transformers:
        lines += ["library_name: sentence-transformers", "pipeline_tag: sentence-similarity"]
    elif config is not None:
        lines.append("library_name: transformers")
        if pipeline_tag(config):
            lines.append(f"pipeline_tag: {pipeline_tag(config)}")
    lines += ["tags:", "- merge", "- mergecli", *(["- sentence-transformers"] if sentence_transformers else []), "---"]
    return "\n".join(lines)


def _input(label: str) -> str:
    return "the base model" if label == "base" else f"`{_cell(label)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return ""


def _source(spec: BaseSpec | ModelSpec, size: int | None = None) -> str:
    """A hub id as a link (with its pinned commit); a local checkpoint by its file or folder name,
    its digest and its size, never by its path."""
    if looks_like_repo_id(spec.path):
        if spec.revision:
            pinned = (f"[`{spec.revision[:12]}`]({HUB_URL}/{spec.path}/tree/{spec.revision})"
                      if len(spec.revision) == 40 else f"`{_cell(spec.revision)}`")
            return f"[{spec.path}]({HUB_URL}/{spec.path}) @ {pinned}"
        return f"[{spec.path}]({HUB_URL}/{spec.path})"
    name = spec.path.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    details = ["local", *([f"`{spec.digest[:19]}…`"] if spec.digest else []), *([_size(size)] if size else [])]
    return f"`{_cell(name)}` ({', '.join(details)})"


def _method(recipe: Recipe, method: Method, config: dict | None) -> list[str]:
    dtype = recipe.dtype
    if dtype == "auto":  # write_support_files sets the config's dtype to the output's
        dtype = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "the first model's dtype"
    reference = "the base model" if recipe.base else f"the first model (`{recipe.models[0].name}`)"
    lines = [*method.describe(recipe), f"- written as {dtype}"]
    if recipe.backbone_only:
        patterns = ", ".join(f"`{_cell(p)}`" for p in recipe.head_patterns)
        lines.append(f"- head tensors ({patterns}) copied from {reference}, not averaged")
    if recipe.exclude:
        patterns = ", ".join(f"`{_cell(p)}`" for p in recipe.exclude)
        lines.append(f"- tensors matching {patterns} copied from {reference}, not merged")
    lines.append(f"- integer tensors copied from {reference}")
    return lines


def _usage(recipe: Recipe, config: dict | None, title: str, *, sentence_transformers: bool = False) -> list[str]:
    where = recipe.push.repo_id if recipe.push and recipe.push.repo_id else f"{USAGE_PLACEHOLDER}{title}"
    if sentence_transformers:  # the pipeline (pooling, normalization) is in modules.json: the library reads it
        code = ["```python", "from sentence_transformers import SentenceTransformer", "",
                f"model = SentenceTransformer({_yaml(where)})",
                'embeddings = model.encode(["A sentence to embed.", "Another one."])']
        return ["## Use", "", *code, "```", ""]
    loader = loader_class(config)
    code = ["```python", f"from transformers import {loader}", "",
            f"model = {loader}.from_pretrained({_yaml(where)})"]
    if recipe.copy_tokenizer and pipeline_tag(config) and pipeline_tag(config) != "image-classification":
        code[1] = f"from transformers import AutoTokenizer, {loader}"
        code.append(f"tokenizer = AutoTokenizer.from_pretrained({_yaml(where)})")
    return ["## Use", "", *code, "```", ""]


def render_card(recipe: Recipe, method: Method, *, config: dict | None, title: str = "merged-model",
                config_from: str | None = None, tokenizer_from: str | None = None,
                sizes: dict[str, int] | None = None, license: str | None = None,
                pipeline_from: str | None = None, notes: dict[str, list[str]] | None = None) -> str:
    """A model card: front matter, models and weights, method, usage, and the recipe that made it.

    Args:
        recipe: the resolved recipe (hub revisions pinned to commits), as written to mergecli.toml.
        method: the recipe's method, which describes itself.
        config: the output's config.json, or None when the inputs had none.
        title: the model's name (its output directory's).
        config_from, tokenizer_from: which input ("base" or a model's name) they were copied from.
        sizes: each input's bytes, by the same names.
        license: the license id of the inputs' cards (the base's, else the first model's that has one).
        pipeline_from: where a sentence-transformers pipeline was copied from (None: there is none).
        notes: per task kind (as `method.kinds` names it), which tensors were merged so and why.
    """
    sizes = sizes or {}
    count = len(recipe.models)
    st = pipeline_from is not None
    architecture = ", ".join(f"`{a}`" for a in (config or {}).get("architectures") or [])
    names = ", ".join(f"`{_cell(spec.name)}`" for spec in recipe.models)
    reference = "the base model" if recipe.base else f"`{_cell(recipe.models[0].name)}`"
    kind = " (a sentence-transformers embedding model)" if st else ""
    lines = [front_matter(recipe, config, license, sentence_transformers=st), "", f"# {title}", "",
             f"A {method.label(recipe)} of {count} model{'s' * (count != 1)}, made with [mergecli]({MERGECLI_URL}) "
             f"{__version__}.", "",
             f"It combines {names} into one model of their architecture{f' ({architecture})' if architecture else ''}"
             f"{kind}, used as {reference} is used.", "", "## Models", "",
             "| model | weight | source |", "|---|---:|---|"]
    for spec, weight in zip(recipe.models, method.shown_weights(recipe)):
        lines.append(f"| {_cell(spec.name)} | {_cell(weight)} | {_source(spec, sizes.get(spec.name))} |")
    lines.append("")
    if recipe.base:
        role = "head, excluded and integer tensors come from it" if recipe.backbone_only else \
            "excluded and integer tensors come from it"
        lines += [f"Base model: {_source(recipe.base, sizes.get('base'))} (never averaged; {role}).", ""]
    provenance = [f"config from {_input(config_from)}" if config_from else "",
                  f"tokenizer from {_input(tokenizer_from)}" if tokenizer_from else "",
                  f"sentence-transformers pipeline from {_input(pipeline_from)}" if pipeline_from else ""]
    if any(provenance):
        lines += [f"Support files: {'; '.join(p for p in provenance if p)}.", ""]
    lines += ["## Method", "", *_method(recipe, method, config)]
    for kind, listed in (notes or {}).items():
        lines.append(f"- {len(listed)} tensor{'s' * (len(listed) != 1)} {method.kinds.get(kind, kind)}: "
                     + ", ".join(f"`{_cell(note)}`" for note in listed))
    lines.append("")
    if config is not None:
        lines += _usage(recipe, config, title, sentence_transformers=st)
    lines += ["## Recipe", "",
              "The recipe as run, with every default filled in and hub revisions pinned to commits. "
              "It is saved next to the weights as `mergecli.toml`; "
              f"`mergecli {method.command} mergecli.toml "
              "-o again/` reproduces this merge bit for bit.", "",
              "```toml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)
