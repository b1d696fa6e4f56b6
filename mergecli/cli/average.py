"""`mergecli average` and `mergecli merge`: one command under two names, a recipe or the recipe-less
`-m/-w` one-liner. `average` runs weighted averages; `merge` any method that needs no statistics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mergecli.cli._console import plural
from mergecli.cli._errors import report_errors
from mergecli.cli._merge import plan_and_run
from mergecli.cli._options import (
    DryRunOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    NoSyncOpt,
    OptionalRecipeArg,
    OutputOpt,
    QuietOpt,
    SetOpt,
    StreamOpt,
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


def recipe_from_options(recipe_path: Path | None, models: list[str], weights: str | None, names: list[str],
                        base: str | None, overrides: list[str]) -> Recipe:
    """A recipe from a file, or the recipe-less one-liner's `-m` / `-w` / `--name` / `--base` options."""
    from mergecli.merge.configs import load_recipe
    from mergecli.recipe import recipe_from_data

    if recipe_path is not None:
        if models or weights or names or base:
            raise UsageError("give either a RECIPE or -m/-w/--name/--base options, not both")
        return load_recipe(recipe_path, overrides=overrides)
    if not models:
        raise UsageError("nothing to merge", hint="give a RECIPE, or at least one -m PATH")
    entries: list[dict] = [{"path": path} for path in models]
    for option, values in (("weights", parse_weights(weights) if weights is not None else None),
                           ("names", names or None)):
        if values is None:
            continue
        if len(values) != len(models):
            raise UsageError(f"{plural(len(values), option[:-1])} for {plural(len(models), 'model')}",
                             hint=f"give one {'-w weight' if option == 'weights' else '--name'} per -m, "
                                  "in the same order")
        for entry, value in zip(entries, values):
            entry[option[:-1]] = value
    data: dict = {"models": entries, **({"base": {"path": base}} if base else {})}
    return recipe_from_data(data, source="command line", base_dir=Path.cwd(), overrides=overrides)


AVERAGE_HELP = """Merge checkpoints by weighted averaging, streaming tensor by tensor.

    RECIPE is a TOML recipe; without one, -m PATH (repeat), -w, --name and --base give a
    recipe-less merge. A PATH that does not exist locally but is a repo id comes from the
    Hugging Face Hub. Exit codes: 0 success, 1 merge failed, 2 usage or recipe error,
    130/143 interrupted.

    Examples:

    \b
      mergecli average recipes/demo-average.toml
      mergecli average recipe.toml -o merged/ --set dtype=bfloat16 --set models.1.weight=0.7
      mergecli average -m ./llama-math -m ./llama-code -w 0.3,0.7 -o merged/
      mergecli average -m a/model.safetensors -m b/model.safetensors --name a --name b -o merged/
      mergecli average recipe.toml --dry-run --json
      mergecli average -m org/llama-math -m org/llama-code --stream -o merged/
    """

MERGE_HELP = """Merge by the recipe's method (a TOML recipe, or a mergekit config run as it is).

    Streams tensor by tensor; statistics of a whole tensor (TIES thresholds, SLERP angles) come from
    streamed passes over its row blocks. Without a recipe, -m PATH (repeat), -w, --name and --base with
    --set method=... give a recipe-less merge. RegMean recipes run with `mergecli regmean merge`. Exit
    codes: 0 success, 1 merge failed, 2 usage or recipe error, 130/143 interrupted.

    Methods:

    \b
{methods}

    Examples:

    \b
      mergecli merge ties.toml
      mergecli merge ties.toml --set ties.density=0.3 --set models.1.weight=0.5 -o merged/ --force
      mergecli merge mergekit.yml -o merged/          # a mergekit config, as mergekit runs it
      mergecli merge task-arithmetic.toml --dry-run --json
      mergecli merge -m ./math -m ./code --base ./base --set method=task_arithmetic -o merged/
      mergecli merge slerp.toml --set slerp.t=0.3
      mergecli merge ties.toml --stream       # hub inputs by range requests, nothing downloaded
      mergecli merge tsv.toml --device cuda   # the SVDs of TSV-M on the GPU
    """


def merge_help() -> str:
    """MERGE_HELP with every method and its one line, read from the methods' own files."""
    from mergecli.methods.registry import method_help

    width = max(map(len, method_help()))
    return MERGE_HELP.format(methods="\n".join(f"      {name:<{width}}  {words}"
                                               for name, words in method_help().items()))


@report_errors
def merge(
    context: typer.Context,
    recipe: OptionalRecipeArg = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    name: Annotated[list[str] | None, typer.Option(
        "--name", metavar="NAME", help="A name for each -m, in order (default: from its path).")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", metavar="PATH", help="Base model: never averaged; heads, excluded and integer tensors "
                                             "come from it.")] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    no_sync: NoSyncOpt = False,
    stream: StreamOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
    device: Annotated[str, typer.Option(
        "--device", metavar="cpu|cuda[:N]",
        help="Where the matrix methods (tsv, iso_c, iso_cts, wudi) take their SVDs and solves; a tensor too "
             "large for it is done on the CPU.")] = "cpu",
    resume: Annotated[bool, typer.Option(
        "--resume", help="Carry on a killed merge of the same output: keep the shards it finished whose "
                         "recorded CRC checks, write the rest (a changed recipe or input starts over).")] = False,
) -> None:
    """`mergecli average` (AVERAGE_HELP) or `mergecli merge` (MERGE_HELP), by the name it was called by."""
    spec = recipe_from_options(recipe, model or [], weights, name or [], base, [*(set_ or []),
                                                                               *(["stream=true"] if stream else [])])
    if device != "cpu":
        from mergecli.stats.device import resolve_device

        device = resolve_device(device)
    plan_and_run(spec, context.info_name, output=output, force=force, dry_run=dry_run, sync=not no_sync,
                 device=device, resume=resume)
