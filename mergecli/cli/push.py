"""`mergecli push`, and the push after a merge whose recipe says `push_to_hub = true`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from mergecli.cli._console import info, out_console, plural, result, warn
from mergecli.cli._errors import report_errors
from mergecli.cli._heavy import import_torch
from mergecli.cli._options import JsonOpt, QuietOpt
from mergecli.cli._render import human_bytes
from mergecli.errors import MergecliError

if TYPE_CHECKING:
    from mergecli.publish.push import PushResult
    from mergecli.recipe import Recipe


def print_push(pushed: PushResult, *, key: str | None = None) -> None:
    """A dry run's file table on stdout; after a push, a summary on stderr and the commit URL on
    stdout (or, with --json, all of it as one JSON object)."""
    data = {"repo_id": pushed.repo_id, "revision": pushed.revision, "private": pushed.private,
            "dry_run": pushed.dry_run, "message": pushed.message, "files": dict(pushed.files),
            "bytes": pushed.bytes, "commit": pushed.commit, "commit_url": pushed.commit_url,
            "changed": pushed.changed}
    where = f"{pushed.repo_id} (branch {pushed.revision}{', private' if pushed.private else ''})"
    if pushed.dry_run:
        result(data, lambda: _print_files(pushed, where), key=key)
        return
    if pushed.changed:
        info(f"pushed {plural(len(pushed.files), 'file')} ({human_bytes(pushed.bytes)}) to {where}")
    else:
        info(f"{where} already holds these {plural(len(pushed.files), 'file')}: no new commit")
    result(data, lambda: out_console.print(pushed.commit_url, markup=False, highlight=False), key=key)


def _print_files(pushed: PushResult, where: str) -> None:
    table = Table(title=f"push to {where} (dry run: nothing sent)", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right")
    for name, size in pushed.files:
        table.add_row(name, human_bytes(size))
    out_console.print(table)
    out_console.print(f"  {plural(len(pushed.files), 'file')}, {human_bytes(pushed.bytes)}; "
                      f"commit message: {pushed.message}", markup=False)


@report_errors
def push(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="A finished mergecli output directory.",
                                              show_default=False)],
    repo_id: Annotated[str | None, typer.Option(
        "--repo-id", metavar="ORG/NAME", help="Model repo (default: [push] repo_id in DIR/mergecli.toml).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", metavar="BRANCH",
                                                 help="Branch to commit to (created if needed).")] = None,
    message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and sizes; send nothing.")] = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Upload a finished merge to the Hugging Face Hub and print the commit URL.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed.

    Examples:

    \b
      mergecli push merged/llama-avg --repo-id me/llama-avg --private
      mergecli push merged/llama-avg --repo-id me/llama-avg --revision v2 --message "v2: more math"
      mergecli push merged/llama-avg --repo-id me/llama-avg --dry-run
    """
    import_torch()
    from mergecli.publish.push import push as push_directory

    print_push(push_directory(directory, repo_id=repo_id, private=private or None, revision=revision,
                              message=message, dry_run=dry_run))
    if dry_run:
        from huggingface_hub import get_token

        if not get_token():
            warn("no Hugging Face token: the push itself will need one with write access "
                 "(log in with `hf auth login` or set HF_TOKEN)")


def push_after_merge(output: Path, recipe: Recipe) -> None:
    """The push that `push_to_hub = true` asks for, with the recipe's `[push]` settings (which the
    recipe's validation guarantees, with a repo_id)."""
    from mergecli.publish.push import push as push_directory

    settings = recipe.push
    try:
        pushed = push_directory(output, repo_id=settings.repo_id, private=settings.private,
                                revision=settings.revision, message=settings.message)
    except (MergecliError, KeyboardInterrupt):
        info(f"the merge is complete in {output}; only the push did not finish: "
             f"retry it with `mergecli push {output}`")
        raise
    print_push(pushed, key="push")
