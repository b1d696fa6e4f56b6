"""The `mergecli` application: the wiring of the command modules, and `--version`."""

from __future__ import annotations

from typing import Annotated

import typer

from mergecli import __version__
from mergecli.cli.average import average
from mergecli.cli.push import push
from mergecli.cli.regmean import regmean_app
from mergecli.cli.validate import validate

app = typer.Typer(
    name="mergecli",
    help="Merge model checkpoints (weighted average, RegMean) from TOML recipes, streaming tensor by "
         "tensor so that memory stays small whatever the model size.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(no_args_is_help=False)(average)
app.add_typer(regmean_app, name="regmean")
app.command()(push)
app.command()(validate)


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
