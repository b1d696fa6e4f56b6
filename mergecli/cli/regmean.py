"""`mergecli regmean collect-stats` (statistics of each model, with progress) and `mergecli regmean
merge` (the merge itself, planned and run like every method's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._console import info, out_console, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._merge import plan_and_run, require_command
from mergecli.cli._options import DryRunOpt, ForceOpt, MemoryBudgetOpt, OutputOpt, QuietOpt, RecipeArg, SetOpt
from mergecli.cli._render import human_bytes, progress

regmean_app = typer.Typer(
    name="regmean",
    help="RegMean: collect activation statistics of each model, then merge its linear layers in "
         "closed form (everything else is averaged).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)

ModelOpt = Annotated[list[str] | None, typer.Option("--model", "-m", metavar="NAME",
                                                    help="Only this model of the recipe (repeat).")]
DeviceOpt = Annotated[str, typer.Option("--device", metavar="cpu|cuda", help="Where to run the models.")]


def with_budget(overrides: list[str] | None, memory_budget: str | None) -> list[str]:
    """The --set overrides, with --memory-budget as the override of regmean.memory_budget."""
    return [*(overrides or []), *([f'regmean.memory_budget="{memory_budget}"'] if memory_budget else [])]


@regmean_app.command("collect-stats")
@report_errors
def collect_stats(
    recipe: RecipeArg,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute statistics that are up to date.")] = False,
    memory_budget: MemoryBudgetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run each model's calibration data through it and save the Gram matrices of its linear layers.

    Examples:

    \b
      mergecli regmean collect-stats recipes/regmean-llama.toml
      mergecli regmean collect-stats recipe.toml --model math --device cuda --force
      torchrun --nproc-per-node 2 -m mergecli regmean collect-stats recipe.toml
    """
    from mergecli.recipe import load_recipe
    from mergecli.regmean.collect import StatsSession, plan_stats

    spec = load_recipe(recipe, overrides=with_budget(set_, memory_budget))
    require_command(spec, "regmean merge")
    if spec.regmean.sequential:
        info("nothing to do: this recipe sets regmean.sequential = true (RegMean++), whose statistics are "
             "collected during `mergecli regmean merge`, block by block; collect-stats is not needed")
        return
    with StatsSession(device) as session:
        quiet = quiet or session.rank != 0
        for job in plan_stats(spec, models=model or [], force=force):
            if job.up_to_date:
                if session.rank == 0:
                    info(f"{job.name}: statistics up to date in {job.directory} (--force recomputes)")
                continue
            for message in job.warnings if session.rank == 0 else []:
                warn(message)
            with progress(job.name, total=0, quiet=quiet, unit="blocks") as update:
                result = session.collect(job, on_progress=lambda done, total: update(done, "", total))
            if session.rank == 0:
                spilled = f", {human_bytes(result.spilled)} of hidden states spilled to disk" if result.spilled else ""
                out_console.print(f"{result.name}: {result.examples} examples, {result.tokens} tokens, "
                                  f"{result.layers} linear layers in {result.grams} Gram matrices "
                                  f"({human_bytes(result.bytes)}) → {result.directory} "
                                  f"({result.seconds:.1f} s{spilled})")
                for message in result.warnings[len(job.warnings):]:
                    warn(message)


@regmean_app.command("merge")
@report_errors
def merge(
    recipe: RecipeArg,
    output: OutputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge with RegMean, using the statistics of `collect-stats`; stream tensor by tensor.

    Examples:

    \b
      mergecli regmean merge recipes/regmean-llama.toml
      mergecli regmean merge recipe.toml -o merged/ --set regmean.reduce_non_diagonal_ratio=0.9
      mergecli regmean merge recipe.toml --dry-run
    """
    from mergecli.recipe import load_recipe

    spec = load_recipe(recipe, overrides=set_ or [])
    plan_and_run(spec, "regmean merge", output=output, force=force, dry_run=dry_run, quiet=quiet)


@regmean_app.command("combine-stats")
@report_errors
def combine_stats(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Where the summed statistics go.", show_default=False)],
    inputs: Annotated[list[Path], typer.Argument(metavar="IN...", help="Statistics of one model, collected in parts.",
                                                 show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds statistics.")] = False,
) -> None:
    """Add up statistics of one model collected in parts (other data, other machines).

    Each IN is a `stats_dir/<model name>` directory written by collect-stats; all must come from
    the same checkpoint. `regmean merge` then reads OUT like any statistics.

    Examples:

    \b
      mergecli regmean combine-stats stats/math part1/math part2/math
      mergecli regmean combine-stats stats/math shard-*/math --force
    """
    from mergecli.regmean.combine import combine_stats as combine

    result = combine(output, inputs, force=force)
    out_console.print(f"{result.directory}: {result.parts} parts, {result.examples} examples, {result.tokens} tokens, "
                      f"{result.grams} Gram matrices ({human_bytes(result.bytes)})")
