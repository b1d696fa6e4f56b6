"""`mergecli average`."""

from __future__ import annotations

import json
from pathlib import Path

from mergecli.cli._console import out_console
from mergecli.cli._errors import report_errors
from mergecli.cli._options import (
    DryRunOpt,
    ForceOpt,
    ModelOpt,
    OptionalRecipeArg,
    OutputOpt,
    QuietOpt,
    SetOpt,
    WeightsOpt,
)
from mergecli.cli._render import print_plan, print_report, progress_bar
from mergecli.errors import UsageError
from mergecli.merge import plan_average, run_merge
from mergecli.recipe import Recipe, load_recipe, recipe_from_data


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.3,0.7") from None


def recipe_from_options(recipe_path: Path | None, models: list[str], weights: str | None,
                        overrides: list[str]) -> Recipe:
    """A recipe from a file, or the recipe-less one-liner's `-m` / `-w` options."""
    if recipe_path is not None:
        if models or weights:
            raise UsageError("give either a RECIPE or -m/-w options, not both")
        return load_recipe(recipe_path, overrides=overrides)
    if not models:
        raise UsageError("nothing to merge", hint="give a RECIPE, or at least one -m PATH")
    entries: list[dict] = [{"path": path} for path in models]
    if weights is not None:
        values = parse_weights(weights)
        if len(values) != len(models):
            raise UsageError(f"{len(values)} weights for {len(models)} models",
                             hint="give one weight per -m, in the same order")
        for entry, value in zip(entries, values):
            entry["weight"] = value
    return recipe_from_data({"models": entries}, source="command line", base_dir=Path.cwd(),
                            overrides=overrides)


def merge_and_report(plan, *, quiet: bool) -> None:
    """Run a planned merge with progress, then print the summary and how to load the result."""
    with progress_bar("merging", total_bytes=plan.bytes_read, total_items=len(plan.tasks),
                      quiet=quiet) as update:
        report = run_merge(plan, on_progress=update)
    print_report(report, "base" if plan.inputs.base else plan.recipe.models[0].name)
    out_console.print(f"\nmerged model: {report.output}")
    auto_class = loader_class(report.output)
    if auto_class:
        out_console.print(f"load it with: from transformers import {auto_class}; "
                          f"{auto_class}.from_pretrained({str(report.output)!r})")


def loader_class(directory: Path) -> str | None:
    """The transformers Auto class that loads a merged directory (None without a config)."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    architectures = json.loads(config.read_text()).get("architectures") or [""]
    for suffix in ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM"):
        if architectures[0].endswith(suffix):
            return f"AutoModel{suffix}"
    return "AutoModel"


@report_errors
def average(
    recipe: OptionalRecipeArg = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge checkpoints by weighted averaging, streaming tensor by tensor.

    RECIPE is a TOML recipe; without one, -m PATH (repeat) and -w give a recipe-less merge.
    Exit codes: 0 success, 1 merge failed, 2 usage or recipe error.

    Examples:

    \b
      mergecli average recipes/demo-average.toml
      mergecli average recipe.toml -o merged/ --set dtype=bfloat16 --set models.1.weight=0.7
      mergecli average -m ./llama-math -m ./llama-code -w 0.3,0.7 -o merged/
      mergecli average recipe.toml --dry-run
    """
    spec = recipe_from_options(recipe, model or [], weights, set_ or [])
    if spec.method != "average":
        raise UsageError(f"this recipe's method is {spec.method!r}",
                         hint=f"run `mergecli {spec.method} merge RECIPE`")
    plan = plan_average(spec, output=output, force=force or dry_run)
    if dry_run:
        print_plan(plan, title="average (dry run: nothing written)")
        plan.inputs.close()
        return
    merge_and_report(plan, quiet=quiet)
    if spec.push_to_hub:
        from mergecli.cli.push import push_after_merge

        push_after_merge(plan.output, spec)

