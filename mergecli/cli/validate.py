"""`mergecli validate`: check a recipe and its inputs, print the plan, write nothing."""

from __future__ import annotations

from mergecli.cli._console import out_console, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._options import OutputOpt, RecipeArg, SetOpt
from mergecli.cli._render import print_plan


@report_errors
def validate(recipe: RecipeArg, output: OutputOpt = None, set_: SetOpt = None) -> None:
    """Check a recipe and its inputs, and print the plan; write nothing.

    Examples:

    \b
      mergecli validate recipes/demo-average.toml
      mergecli validate recipe.toml --set models.0.path=./other-model
    """
    from mergecli.merge.plan import plan_merge
    from mergecli.recipe import load_recipe

    spec = load_recipe(recipe, overrides=set_ or [])
    plan = plan_merge(spec, output=output, force=True)
    try:
        print_plan(plan, title=f"{recipe}: valid {spec.method} recipe")
        if plan.output.exists():
            warn(f"{plan.output} exists: the merge needs --force to replace it")
        out_console.print("[green]ok[/]")
    finally:
        plan.inputs.close()
