"""Options and arguments shared by several commands, defined once as `Annotated` aliases so that
every command spells and documents them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(metavar="RECIPE", help="TOML recipe.", show_default=False)]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output directory (overrides the recipe's `output`).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a recipe key, e.g. --set normalize=false --set models.1.weight=0.7."),
]
StatsSetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override a recipe key, e.g. --set regmean.num_examples=64 --set models.0.data=more.jsonl."),
]
ForceOpt = Annotated[bool, typer.Option("--force",
                                        help="Replace an earlier output of mergecli (or an empty directory).")]
MemoryBudgetOpt = Annotated[
    str | None, typer.Option("--memory-budget", metavar="SIZE",
                             help="RAM for calibration hidden states (e.g. 4GB); beyond it they spill to disk. "
                                  "Sets regmean.memory_budget.")]
NoSyncOpt = Annotated[bool, typer.Option(
    "--no-sync", help="Do not wait for the output to reach the disk before putting it in place (for scratch "
                      "outputs: after a power loss it may hold zeros).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; write nothing.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
OptionalRecipeArg = Annotated[Path | None, typer.Argument(metavar="RECIPE", help="TOML recipe (or use -m).",
                                                          show_default=False)]
ModelOpt = Annotated[
    list[str] | None, typer.Option("--model", "-m", metavar="PATH", help="A model to merge (repeat).")
]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", "-w", metavar="W1,W2,...", help="Weights, one per -m, e.g. 0.3,0.7.")
]
StreamOpt = Annotated[bool, typer.Option(
    "--stream", help="Read hub inputs by HTTP range requests as the merge needs them, storing nothing of them "
                     "(files complete in the cache are read from it); each file is checked against the Hub's "
                     "sha256. Sets `stream = true`.")]
