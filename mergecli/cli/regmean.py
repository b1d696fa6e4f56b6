"""`mergecli regmean collect-stats` and `mergecli regmean merge`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mergecli.cli._console import err_console, info, interactive, out_console, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._merge import execute, require_method
from mergecli.cli._options import DryRunOpt, ForceOpt, OutputOpt, QuietOpt, RecipeArg, SetOpt
from mergecli.cli._render import human_bytes
from mergecli.recipe import load_recipe

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


@contextmanager
def stats_progress(name: str, total: int, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A callback `(examples, tokens)` drawing a bar of examples with a token count, or log lines."""
    if interactive(quiet):
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("examples, {task.fields[tokens]} tokens ({task.fields[rate]} tokens/s)"),
                   TimeRemainingColumn())
        with Progress(*columns, console=err_console) as progress:
            task = progress.add_task(name, total=total, tokens=0, rate=0)
            clock = {"started": time.monotonic()}

            def update(examples: int, tokens: int) -> None:
                if examples == 0:  # (0, 0) comes when the model is loaded and the batches start
                    clock["started"] = time.monotonic()
                rate = tokens / max(time.monotonic() - clock["started"], 1e-9)
                progress.update(task, completed=examples, tokens=tokens, rate=f"{rate:,.0f}")

            yield update
        return
    started = time.monotonic()
    last = {"tenth": -1}
    info(f"{name}: {total} examples")

    def log(examples: int, tokens: int) -> None:
        if examples == 0:
            return
        tenth = 10 * examples // max(total, 1)
        if tenth > last["tenth"]:
            last["tenth"] = tenth
            info(f"{name}: {examples}/{total} examples, {tokens} tokens, {time.monotonic() - started:.0f} s")

    yield log


@regmean_app.command("collect-stats")
@report_errors
def collect_stats(
    recipe: RecipeArg,
    model: ModelOpt = None,
    device: DeviceOpt = "cpu",
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute statistics that are up to date.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run each model's calibration data through it and save the Gram matrices of its linear layers.

    Examples:

    \b
      mergecli regmean collect-stats recipes/regmean-llama.toml
      mergecli regmean collect-stats recipe.toml --model math --device cuda --force
      torchrun --nproc-per-node 2 -m mergecli regmean collect-stats recipe.toml
    """
    from mergecli.stats import StatsSession, plan_stats

    spec = require_method(load_recipe(recipe, overrides=set_ or []), "regmean")
    with StatsSession(device) as session:
        quiet = quiet or session.rank != 0
        for job in plan_stats(spec, models=model or [], force=force):
            if job.up_to_date:
                if session.rank == 0:
                    info(f"{job.name}: statistics up to date in {job.directory} (--force recomputes)")
                continue
            for message in job.warnings if session.rank == 0 else []:
                warn(message)
            total = len(job.data.examples[session.rank::session.world])
            with stats_progress(job.name, total, quiet=quiet) as update:
                result = session.collect(job, on_progress=update)
            if session.rank == 0:
                out_console.print(f"{result.name}: {result.examples} examples, {result.tokens} tokens, "
                                  f"{result.layers} linear layers in {result.grams} Gram matrices "
                                  f"({human_bytes(result.bytes)}) → {result.directory} ({result.seconds:.1f} s)")
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
    from mergecli.regmean_merge import plan_regmean

    spec = require_method(load_recipe(recipe, overrides=set_ or []), "regmean")
    execute(plan_regmean(spec, output=output, force=force or dry_run), dry_run=dry_run, quiet=quiet)
