"""`mergecli sweep`: a grid of recipe settings scored on held-out data, the best optionally written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._console import info, result, say
from mergecli.cli._errors import report_errors
from mergecli.cli._heavy import import_torch
from mergecli.cli._options import ForceOpt, JsonOpt, QuietOpt, RecipeArg, SetOpt


@report_errors
def sweep(
    recipe: RecipeArg,
    grid: Annotated[list[str], typer.Option("--grid", metavar="KEY=V1,V2,...",
                                            help="A recipe key and its values (repeat: every combination).",
                                            show_default=False)],
    data: Annotated[str, typer.Option("--data", metavar="FILE", help="Held-out text (.jsonl or .txt).",
                                      show_default=False)],
    num_examples: Annotated[int, typer.Option("--num-examples", min=1, help="Examples read from FILE.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Tokens per example, at most.")] = 512,
    device: Annotated[str, typer.Option("--device", help="Where the blocks run: cpu, cuda, mps.")] = "cpu",
    memory_budget: Annotated[str, typer.Option("--memory-budget", metavar="SIZE",
                                               help="RAM for hidden states; beyond it they spill.")] = "2GB",
    report: Annotated[Path | None, typer.Option("--report", metavar="DIR",
                                                help="Write results.json and loss.png (loss against each key) "
                                                     "here.")] = None,
    write_best: Annotated[bool, typer.Option("--write-best", help="Merge the best candidate into -o DIR, its "
                                                                  "recipe in mergecli.toml.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where --write-best writes.")] = None,
    fail_above: Annotated[float | None, typer.Option("--fail-above", metavar="LOSS",
                                                     help="Exit 1 when even the best loss is above LOSS.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Score every combination of --grid values on FILE (mean next-token loss), ranked, best first.
    Nothing is written but what --report and --write-best ask for: the candidates run side by side, one
    transformer block at a time, and each input block is read once for all of them. Exit codes: 0, 1 a
    broken input or --fail-above, 2 usage or recipe error.

    Examples:

    \b
      mergecli sweep ties.toml --grid ties.density=0.2,0.4,0.6 --grid models.1.weight=0.3,0.7 --data held-out.jsonl
      mergecli sweep ties.toml --grid ties.density=0.2,0.5 --data held-out.txt --write-best -o merged/ --fail-above 3.2
    """
    from mergecli.errors import MergecliError, UsageError
    from mergecli.merge.configs import load_recipe
    from mergecli.merge.sweep import grid_overrides
    from mergecli.recipe.schema import parse_size

    if write_best and output is None:
        raise UsageError("--write-best needs -o DIR", hint="e.g. --write-best -o merged/")
    combos = grid_overrides(grid)
    recipes = [load_recipe(recipe, overrides=[*(set_ or []), *(f"{k}={v}" for k, v in combo.items())])
               for combo in combos]  # a bad key or value: said before anything is read
    import_torch()
    from mergecli.cli._render import progress
    from mergecli.merge.sweep import plot
    from mergecli.merge.sweep import sweep as run

    with progress("scoring", total=0, unit="blocks") as update:
        found = run(recipes, combos, data, num_examples=num_examples, batch_size=batch_size, max_length=max_length,
                    device=device, memory_budget=parse_size(memory_budget),
                    on_progress=lambda done, count, what: update(done, f"block {done}/{count} of {what}",
                                                                 total=count))
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        found["plot"] = str(plot(found["candidates"], report / "loss.png"))
        (report / "results.json").write_text(json.dumps({"candidates": found["candidates"]}, indent=2) + "\n")
    best = found["candidates"][0]
    if write_best:
        from mergecli.merge.plan import plan_merge
        from mergecli.merge.run import run_merge

        plan = plan_merge(recipes[found["order"][0]], output=output, force=force)
        try:
            run_merge(plan)
        finally:
            plan.inputs.close()
        found["written"] = str(output)

    def table() -> None:
        keys = list(best["settings"])
        say("  ".join([f"{'rank':>4}", *[f"{k:>16}" for k in keys], f"{'loss':>10}", f"{'perplexity':>12}"]))
        for number, candidate in enumerate(found["candidates"], start=1):
            say("  ".join([f"{number:>4}", *[f"{candidate['settings'][k]!s:>16}" for k in keys],
                           f"{candidate['loss']:>10.4f}", f"{candidate['perplexity']:>12.3f}"]))
        if "plot" in found:
            info(f"plot: {found['plot']}")
        if "written" in found:
            info(f"best candidate merged into {found['written']}")

    del found["order"]
    result(found, table)
    if fail_above is not None and best["loss"] > fail_above:
        raise MergecliError(f"the best candidate's loss {best['loss']:.4f} is above --fail-above {fail_above}")
