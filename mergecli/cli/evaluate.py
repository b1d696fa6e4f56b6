"""`mergecli eval`: each input's and the merge's loss on held-out data, the merge never written."""

from __future__ import annotations

from typing import Annotated

import typer

from mergecli.cli._console import say
from mergecli.cli._errors import report_errors
from mergecli.cli._heavy import import_torch
from mergecli.cli._options import JsonOpt, QuietOpt, RecipeArg, SetOpt


@report_errors
def evaluate(
    recipe: RecipeArg,
    data: Annotated[str, typer.Option("--data", metavar="FILE", help="Held-out text: .jsonl (text or chat "
                                                                      "messages) or .txt (one example a line).",
                                      show_default=False)],
    num_examples: Annotated[int, typer.Option("--num-examples", min=1, help="Examples read from FILE.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option("--max-length", min=2, help="Tokens per example, at most.")] = 512,
    device: Annotated[str, typer.Option("--device", help="Where the blocks run: cpu, cuda, cuda:1, mps.")] = "cpu",
    memory_budget: Annotated[str, typer.Option(
        "--memory-budget", metavar="SIZE", help="RAM for hidden states; beyond it they spill to disk.")] = "2GB",
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Print the mean next-token loss and perplexity on FILE of each input model and of the recipe's
    merge. Nothing is written: every model runs one transformer block at a time, and the merge's blocks
    are merged when the data reaches them, in the memory RegMean++ uses. Exit codes: 0, 1 a broken input,
    2 usage or recipe error.

    Examples:

    \b
      mergecli eval recipe.toml --data held-out.jsonl
      mergecli eval recipe.toml --data held-out.txt --set ties.density=0.3 --json
    """
    from mergecli.merge.configs import load_recipe
    from mergecli.recipe.schema import parse_size

    spec = load_recipe(recipe, overrides=set_ or [])
    import_torch()
    from mergecli.cli._render import progress
    from mergecli.merge.evaluate import evaluate as run

    with progress("scoring", total=0, unit="blocks") as update:
        report = run(spec, data, num_examples=num_examples, batch_size=batch_size, max_length=max_length, device=device,
                     memory_budget=parse_size(memory_budget),
                     on_progress=lambda done, count, what: update(done, f"block {done}/{count} of {what}",
                                                                  total=count))
    from mergecli.cli._console import result

    def table() -> None:
        say(f"{'model':<24} {'loss':>10} {'perplexity':>12} {'tokens':>8}")
        for row in [*report["models"], report["merge"]]:
            say(f"{row['name']:<24} {row['loss']:>10.4f} {row['perplexity']:>12.3f} {row['tokens']:>8}")

    result(report, table)
