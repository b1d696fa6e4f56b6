"""`mergecli average`: a recipe, or the recipe-less `-m/-w` one-liner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergecli.cli._errors import report_errors
from mergecli.cli._merge import plan_and_run
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
from mergecli.errors import UsageError

if TYPE_CHECKING:
    from mergecli.recipe import Recipe


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.3,0.7") from None


def recipe_from_options(recipe_path: Path | None, models: list[str], weights: str | None,
                        overrides: list[str]) -> Recipe:
    """A recipe from a file, or the recipe-less one-liner's `-m` / `-w` options."""
    from mergecli.recipe import load_recipe, recipe_from_data

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
    plan_and_run(spec, "average", output=output, force=force, dry_run=dry_run, quiet=quiet)
