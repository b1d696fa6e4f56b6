"""`mergecli regmean collect-stats` (statistics of each model, with progress) and `mergecli regmean
merge` (the merge itself, planned and run like every method's)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._console import info, out_console, plural, result, say, set_mode, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._heavy import import_torch
from mergecli.cli._merge import plan_and_run
from mergecli.cli._options import (
    DryRunOpt,
    ForceOpt,
    JsonOpt,
    MemoryBudgetOpt,
    NoSyncOpt,
    OutputOpt,
    QuietOpt,
    RecipeArg,
    SetOpt,
    StatsSetOpt,
    StreamOpt,
)
from mergecli.cli._render import human_bytes, progress

regmean_app = typer.Typer(
    name="regmean",
    help="RegMean: collect activation statistics of each model, then merge its linear layers in "
         "closed form (everything else is averaged).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

OnlyOpt = Annotated[list[str] | None, typer.Option("--only", metavar="NAME",
                                                   help="Only this model of the recipe, by name (repeat).")]
OldModelOpt = Annotated[list[str] | None, typer.Option("--model", "-m", hidden=True)]  # before 0.3: --only
DeviceOpt = Annotated[str, typer.Option("--device", metavar="cpu|cuda[:N]",
                                        help="Where to run the models (RegMean++ runs them during the merge).")]


def with_budget(overrides: list[str] | None, memory_budget: str | None) -> list[str]:
    """The --set overrides, with --memory-budget as the override of regmean.memory_budget."""
    return [*(overrides or []), *([f'regmean.memory_budget="{memory_budget}"'] if memory_budget else [])]


class _Reporter:
    """collect-stats' lines: a progress bar per model, its summary, and its warnings."""

    def skipped(self, job) -> None:
        info(f"{job.name}: statistics up to date in {job.directory} (--force recomputes)")

    @contextmanager
    def collecting(self, job):
        for message in job.warnings:
            warn(message)
        self.warned = len(job.warnings)
        with progress(job.name, total=0, unit="blocks") as update:
            yield lambda count, total: update(count, "", total)

    def collected(self, stats) -> None:
        spilled = f", {human_bytes(stats.spilled)} of hidden states spilled to disk" if stats.spilled else ""
        say(f"{stats.name}: {plural(stats.examples, 'example')}, {plural(stats.tokens, 'token')}, "
            f"{plural(stats.layers, 'linear layer')} in {plural(stats.grams, 'Gram matrix', 'Gram matrices')} "
            f"({human_bytes(stats.bytes)}) → {stats.directory} ({stats.seconds:.1f} s{spilled})")
        for message in stats.warnings[self.warned:]:
            warn(message)


@regmean_app.command("collect-stats")
@report_errors
def collect_stats(
    recipe: RecipeArg,
    only: OnlyOpt = None,
    device: DeviceOpt = "cpu",
    set_: StatsSetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute statistics that are up to date.")] = False,
    memory_budget: MemoryBudgetOpt = None,
    stream: StreamOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
    model: OldModelOpt = None,
) -> None:
    """Run each model's calibration data through it and save the Gram matrices of its linear layers.

    Examples:

    \b
      mergecli regmean collect-stats recipes/regmean-llama.toml
      mergecli regmean collect-stats recipe.toml --only math --device cuda --force
      mergecli regmean collect-stats recipe.toml --memory-budget 4GB
      torchrun --nproc-per-node 2 -m mergecli regmean collect-stats recipe.toml
    """
    from mergecli.merge.configs import load_recipe

    if model:
        warn("--model is now --only on collect-stats (on the merge commands, -m/--model is a model to merge)")
    spec = load_recipe(recipe, overrides=[*with_budget(set_, memory_budget), *(["stream=true"] if stream else [])])
    import_torch()
    from mergecli.merge.job import Job

    Job(spec).bind(command="regmean merge")
    if spec.settings.sequential:
        info("nothing to do: this recipe sets regmean.sequential = true (RegMean++), whose statistics are "
             "collected during `mergecli regmean merge`, block by block; collect-stats is not needed")
        result({"models": [], "sequential": True}, lambda: None)
        return
    from mergecli.stats.collect import collect_all, process_rank

    if process_rank()[0] != 0:  # under torchrun, rank 0 speaks for every process
        set_mode(quiet=True)
    done = collect_all(spec.models, spec.settings, only=[*(only or []), *(model or [])], force=force, device=device,
                       reporter=_Reporter(),
                       stream=(spec.stream_connections, spec.stream_buffer) if spec.stream else None)
    result({"models": done}, lambda: None)


@regmean_app.command("merge")
@report_errors
def merge(
    recipe: RecipeArg,
    output: OutputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    memory_budget: MemoryBudgetOpt = None,
    device: DeviceOpt = "cpu",
    dry_run: DryRunOpt = False,
    no_sync: NoSyncOpt = False,
    stream: StreamOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Merge with RegMean (or RegMean++), using the statistics of `collect-stats`; stream tensor by
    tensor, block by block.

    Examples:

    \b
      mergecli regmean merge recipes/regmean-llama.toml
      mergecli regmean merge recipe.toml -o merged/ --set regmean.reduce_non_diagonal_ratio=0.9
      mergecli regmean merge recipes/regmean-plusplus.toml --memory-budget 2GB --device cuda
      mergecli regmean merge recipe.toml --dry-run --json
    """
    from mergecli.merge.configs import load_recipe

    spec = load_recipe(recipe, overrides=[*with_budget(set_, memory_budget), *(["stream=true"] if stream else [])])
    plan_and_run(spec, "regmean merge", output=output, force=force, dry_run=dry_run, sync=not no_sync,
                 device=device)


@regmean_app.command("combine-stats")
@report_errors
def combine_stats(
    output: Annotated[Path, typer.Argument(metavar="OUT", help="Where the summed statistics go.", show_default=False)],
    inputs: Annotated[list[Path], typer.Argument(metavar="IN...", help="Statistics of one model, collected in parts.",
                                                 show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds statistics.")] = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Add up statistics of one model collected in parts (other data, other machines).

    Each IN is a `stats_dir/<model name>` directory written by collect-stats; all must come from
    the same checkpoint. `regmean merge` then reads OUT like any statistics.

    Examples:

    \b
      mergecli regmean combine-stats stats/math part1/math part2/math
      mergecli regmean combine-stats stats/math shard-*/math --force
    """
    import_torch()
    from mergecli.stats.combine import combine_stats as combine

    combined = combine(output, inputs, force=force)
    data = {"directory": str(combined.directory), "parts": combined.parts, "examples": combined.examples,
            "tokens": combined.tokens, "grams": combined.grams, "bytes": combined.bytes}
    result(data, lambda: out_console.print(
        f"{combined.directory}: {plural(combined.parts, 'part')}, {plural(combined.examples, 'example')}, "
        f"{plural(combined.tokens, 'token')}, {plural(combined.grams, 'Gram matrix', 'Gram matrices')} "
        f"({human_bytes(combined.bytes)})", markup=False))
