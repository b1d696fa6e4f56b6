"""`mergecli validate`."""

from __future__ import annotations

from mergecli.cli._console import out_console, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._options import OutputOpt, RecipeArg, SetOpt
from mergecli.cli._render import print_plan
from mergecli.merge import plan_average
from mergecli.recipe import load_recipe


@report_errors
def validate(recipe: RecipeArg, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Check a recipe and its inputs, and print the plan; write nothing.

    Examples:

    \b
      mergecli validate recipes/demo-average.toml
      mergecli validate recipe.toml --set models.0.path=./other-model
    """
    spec = load_recipe(recipe, overrides=set_ or [])
    if spec.method == "regmean":
        from mergecli.regmean_merge import plan_regmean

        plan = plan_regmean(spec, output=output, force=True)
    else:
        plan = plan_average(spec, output=output, force=True)
    try:
        print_plan(plan, title=f"{recipe}: valid {spec.method} recipe")
        if plan.output.exists():
            warn(f"{plan.output} exists: the merge needs --force to replace it")
        out_console.print("[green]ok[/]")
    finally:
        plan.inputs.close()
