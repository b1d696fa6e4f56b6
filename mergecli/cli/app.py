"""The `mergecli` application: the wiring of the command modules, and `--version`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from mergecli import __version__
from mergecli.cli._errors import print_error
from mergecli.cli.average import AVERAGE_HELP, merge, merge_help
from mergecli.cli.convert import convert
from mergecli.cli.evaluate import evaluate
from mergecli.cli.extract_lora import extract_lora
from mergecli.cli.push import push
from mergecli.cli.regmean import regmean_app
from mergecli.cli.sweep import sweep
from mergecli.cli.validate import validate


class _Commands(TyperGroup):
    """The command group, with usage errors said as every other error is: `error:` and `hint:` lines."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):  # noqa: ANN201 (click's own signature)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort as exc:  # Ctrl-C while the command line was parsed
            raise exc.__cause__ if isinstance(exc.__cause__, KeyboardInterrupt) else KeyboardInterrupt from None
        except TyperException as exc:  # a usage error: unknown option, missing argument, bad value
            context = getattr(exc, "ctx", None)
            if context is not None and exc.format_message() == context.get_help():  # no command given: the help
                typer.echo(exc.format_message())
            else:
                print_error(exc.format_message(), f"see `{context.command_path if context else 'mergecli'} --help`")
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mergecli",
    cls=_Commands,
    help="""Merge model checkpoints from TOML recipes (or mergekit configs), by any of its methods
    (`mergecli merge --help` lists them), streaming tensor by tensor (and block by block), so that
    memory stays small whatever the model size.

    Examples:

    \b
      mergecli average -m ./llama-math -m ./llama-code -w 0.3,0.7 -o merged/
      mergecli average recipe.toml --dry-run
      mergecli merge ties.toml                        # any method without statistics
      mergecli merge mergekit.yml -o merged/          # a mergekit config, as it is
      mergecli validate recipe.toml
      mergecli regmean collect-stats recipe.toml && mergecli regmean merge recipe.toml
      mergecli regmean merge plusplus.toml          # [regmean] sequential = true: RegMean++
      mergecli eval ties.toml --data held-out.jsonl   # each input's loss and the merge's, nothing written
      mergecli sweep ties.toml --grid ties.density=0.2,0.5 --data held-out.jsonl
      mergecli extract-lora merged/ --base meta-llama/Llama-3.1-8B --rank 32 -o adapter/
      torchrun --nproc-per-node 4 -m mergecli merge ties.toml   # the ranks split the output's shards
      mergecli push merged/ --repo-id me/llama-merged
    """,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("merge", help=merge_help())(merge)
app.command("average", help=AVERAGE_HELP)(merge)
app.add_typer(regmean_app, name="regmean")
app.command()(push)
app.command()(validate)
app.command()(convert)
app.command("extract-lora")(extract_lora)
app.command("eval")(evaluate)
app.command()(sweep)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mergecli {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Merge model checkpoints from TOML recipes."""
