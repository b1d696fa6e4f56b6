"""`mergecli validate`: check a recipe and its inputs, print the plan, write nothing."""

from __future__ import annotations

from pathlib import Path

from mergecli.cli._console import say, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._heavy import import_torch
from mergecli.cli._options import JsonOpt, OutputOpt, QuietOpt, RecipeArg, SetOpt
from mergecli.cli._render import print_plan


@report_errors
def validate(recipe: RecipeArg, output: OutputOpt = None, set_: SetOpt = None, quiet: QuietOpt = False,
             json_output: JsonOpt = False) -> None:
    """Check a recipe and its inputs, and print the plan; write nothing, download no weights.

    Hub inputs are checked from their safetensors headers alone (HTTP range requests). With
    push_to_hub, the token and write access to the repo are checked too. Exit codes: 0 valid,
    1 an input is broken, 2 usage or recipe error.

    Examples:

    \b
      mergecli validate recipes/demo-average.toml
      mergecli validate recipe.toml --set models.0.path=./other-model
      mergecli validate recipe.toml --json
    """
    from mergecli.merge.configs import load_recipe

    spec = load_recipe(recipe, overrides=set_ or [])  # a recipe error is found before any heavy import
    import_torch()
    from mergecli.merge.job import Job
    from mergecli.merge.plan import plan_merge

    job = Job(spec).bind(push=True)  # with push_to_hub: the token and write access too
    placeholder = output is None and spec.output is None  # a converted mergekit config names none
    plan = plan_merge(job, output=Path("merged") if placeholder else output, force=True, dry_run=True)
    if placeholder:
        plan.notes.append("the recipe names no output: the merge needs -o DIR (planned here as ./merged)")
    try:
        print_plan(plan, title=f"{recipe}: valid {spec.method} recipe")
        if plan.output.exists():
            warn(f"{plan.output} exists: the merge needs --force to replace it")
        say("ok")
    finally:
        plan.inputs.close()
