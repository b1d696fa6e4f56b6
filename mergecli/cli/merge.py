"""`mergecli merge`: a recipe of any method that needs no statistics (average, task arithmetic, TIES,
DARE, SLERP, and methods that plugins register)."""

from __future__ import annotations

from mergecli.cli._errors import report_errors
from mergecli.cli._merge import plan_and_run
from mergecli.cli._options import DryRunOpt, ForceOpt, JsonOpt, NoSyncOpt, OutputOpt, QuietOpt, RecipeArg, SetOpt


@report_errors
def merge(
    recipe: RecipeArg,
    output: OutputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    no_sync: NoSyncOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Merge by the recipe's method: average, task_arithmetic, ties, dare_linear, dare_ties or slerp.

    Streams tensor by tensor; statistics of a whole tensor (TIES thresholds, SLERP angles) come from
    streamed passes over its row blocks. RegMean recipes run with `mergecli regmean merge`. Exit
    codes: 0 success, 1 merge failed, 2 usage or recipe error, 130/143 interrupted.

    Examples:

    \b
      mergecli merge ties.toml
      mergecli merge ties.toml --set ties.density=0.3 --set models.1.weight=0.5 -o merged/ --force
      mergecli merge task-arithmetic.toml --dry-run --json
      mergecli merge slerp.toml --set slerp.t=0.3
    """
    from mergecli.recipe import load_recipe

    plan_and_run(load_recipe(recipe, overrides=set_ or []), "merge", output=output, force=force, dry_run=dry_run,
                 sync=not no_sync)
