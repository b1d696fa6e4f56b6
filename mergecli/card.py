"""The model card (README.md) written into every output: what the hub shows."""

from __future__ import annotations

from mergecli import __version__
from mergecli.hub import looks_like_repo_id
from mergecli.recipe import Recipe, dump_recipe

_PIPELINES = {
    "ForCausalLM": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForImageClassification": "image-classification",
}


def _pipeline_tag(config: dict | None) -> str | None:
    for architecture in (config or {}).get("architectures") or []:
        for suffix, tag in _PIPELINES.items():
            if architecture.endswith(suffix):
                return tag
    return None


def _front_matter(recipe: Recipe, config: dict | None) -> list[str]:
    hub_ids = [m.path for m in ([recipe.base] if recipe.base else []) + list(recipe.models)
               if looks_like_repo_id(m.path)]
    lines = ["---"]
    if hub_ids:
        lines.append("base_model:")
        lines.extend(f"- {repo}" for repo in dict.fromkeys(hub_ids))
    lines += ["tags:", "- merge", "- mergecli"]
    if config is not None:
        lines.append("library_name: transformers")
    tag = _pipeline_tag(config)
    if tag:
        lines.append(f"pipeline_tag: {tag}")
    lines.append("---")
    return lines


def render_card(recipe: Recipe, *, config: dict | None) -> str:
    """A model card: front matter, method, models and weights, and the recipe that made it."""
    method = {"average": "weighted average", "regmean": "RegMean (Jin et al., 2023)"}[recipe.method]
    title = recipe.output.rstrip("/").rsplit("/", 1)[-1] if recipe.output else "merged model"
    lines = _front_matter(recipe, config)
    lines += ["", f"# {title}", "",
              f"This model is a **{method}** merge of {len(recipe.models)} models, made with "
              f"[mergecli](https://pypi.org/project/mergecli/) {__version__}.", ""]
    if recipe.base:
        lines += [f"Base model: `{recipe.base.path}`", ""]
    lines += ["| model | weight |", "|---|---|"]
    for model, weight in zip(recipe.models, recipe.weights):
        lines.append(f"| `{model.path}` | {weight:.4g} |")
    lines += ["", "## Recipe", "", "```toml", dump_recipe(recipe).rstrip(), "```", ""]
    return "\n".join(lines)
