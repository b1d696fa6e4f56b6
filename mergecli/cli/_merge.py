"""What every merge command does once it has a plan: print it (dry run), or run it with progress,
summarize, say how to load the result, and push it when the recipe asks."""

from __future__ import annotations

import json
from pathlib import Path

from mergecli.cli._console import out_console
from mergecli.cli._render import print_plan, print_report, progress_bar
from mergecli.errors import UsageError
from mergecli.merge import MergePlan, run_merge
from mergecli.recipe import Recipe

COMMANDS = {"average": "mergecli average RECIPE", "regmean": "mergecli regmean merge RECIPE"}


def require_method(recipe: Recipe, method: str) -> Recipe:
    """The recipe, if its `method` is the one this command runs; else a usage error naming the right command."""
    if recipe.method != method:
        raise UsageError(f"this recipe's method is {recipe.method!r}",
                         hint=f"run `{COMMANDS[recipe.method]}`, or set method = \"{method}\"")
    return recipe


def execute(plan: MergePlan, *, dry_run: bool, quiet: bool) -> None:
    """Dry run: print the plan and close the inputs. Otherwise merge, report, and push if asked."""
    if dry_run:
        try:
            print_plan(plan, title=f"{plan.recipe.method} (dry run: nothing written)")
        finally:
            plan.inputs.close()
        return
    merge_and_report(plan, quiet=quiet)
    if plan.recipe.push_to_hub:
        from mergecli.cli.push import push_after_merge

        push_after_merge(plan.output, plan.recipe)


def merge_and_report(plan: MergePlan, *, quiet: bool) -> None:
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
