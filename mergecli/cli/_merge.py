"""What every merge command does once it has a recipe: check that the recipe's method is the one
the command runs, plan, then print the plan (dry run) or run it with progress, summarize, say how to
load the result, and push it when the recipe asks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mergecli.cli._console import interactive, plural, say
from mergecli.cli._heavy import import_torch
from mergecli.cli._render import human_bytes, print_plan, print_report, progress
from mergecli.errors import OutputInPlace, UsageError

if TYPE_CHECKING:
    from mergecli.io.head_start import HeadStart
    from mergecli.merge.plan import MergePlan
    from mergecli.recipe import Recipe


def require_command(recipe: Recipe, command: str) -> None:
    """Refuse a recipe whose method another command runs, naming that command."""
    from mergecli.methods.registry import method_of

    method = method_of(recipe)
    if method.command != command and not (command == "merge" and method.command == "average"):
        raise UsageError(f"this recipe's method is {recipe.method!r}, which `mergecli {method.command}` runs",
                         hint=f"run `mergecli {method.command} RECIPE`")


def plan_and_run(recipe: Recipe, command: str, *, output: Path | None, force: bool, dry_run: bool,
                 sync: bool = True, device: str = "cpu") -> None:
    """Dry run: print the plan. Otherwise merge, report, and push if the recipe asks."""
    head_start = start_streaming(recipe, output, force=force) if recipe.stream and not dry_run else None
    try:
        import_torch()
        from mergecli.merge.plan import plan_merge

        require_command(recipe, command)
        if recipe.push_to_hub and not dry_run:
            from mergecli.publish.push import check_access

            check_access(recipe.push.repo_id)  # before the merge: a token problem found after it wastes the merge
        plan = plan_merge(recipe, output=output, force=force or dry_run, dry_run=dry_run, sync=sync, device=device,
                          fetcher=head_start.fetcher() if head_start else None)
    except BaseException:
        if head_start is not None:
            head_start.fetcher().close()
        raise
    if dry_run:
        try:
            print_plan(plan, title=f"{recipe.method} (dry run: nothing written)")
        finally:
            plan.inputs.close()
        return
    merge_and_report(plan)
    if recipe.push_to_hub:
        from mergecli.cli.push import push_after_merge

        push_after_merge(plan.output, recipe)


def start_streaming(recipe: Recipe, output: Path | None, *, force: bool) -> HeadStart:
    """With `--stream`: start fetching the hub inputs while torch imports and the merge is planned,
    once the output is known to be writable (a refusal then costs no transfer)."""
    from mergecli.io.atomic import check_output_path, output_directory
    from mergecli.io.head_start import HeadStart

    check_output_path(output_directory(output if output is not None else recipe.output), [], force=force)
    return HeadStart([(spec.path, spec.revision) for spec in recipe.input_specs],
                     connections=recipe.stream_connections, buffer=recipe.stream_buffer)


def fetch_rate(plan: MergePlan) -> Callable[[], str]:
    """With `--stream`: ", 1.2 GB fetched, 180 MB/s" for the progress bar (nothing without it)."""
    fetcher, started = plan.inputs.fetcher, time.monotonic()
    if fetcher is None:
        return lambda: ""

    def words() -> str:
        seconds = time.monotonic() - started
        rate = f", {human_bytes(fetcher.fetched / seconds)}/s" if seconds > 1 else ""
        return f", {human_bytes(fetcher.fetched)} fetched{rate}"

    return words


def merge_and_report(plan: MergePlan) -> None:
    """Run a planned merge with progress, then print the summary and how to load the result."""
    from mergecli.merge.card import loader_class
    from mergecli.merge.run import run_merge

    tensors = len(plan.tasks)
    fetched = fetch_rate(plan) if interactive() else lambda: ""
    with progress("merging", total=plan.work, unit="work", what=plural(tensors, "tensor")) as update:
        report = run_merge(plan, on_progress=lambda done, work, stage: update(
            work, f"{done}/{tensors} tensors{fetched()}", step=stage))
        update(plan.work, f"{tensors}/{tensors} tensors")  # a pass that had nothing to do was counted in
    try:
        print_report(report, plan.method, plan.reference_name)
        say(f"\nmerged model: {report.output}")
        if plan.support.config is not None:
            auto_class = loader_class(plan.support.config)
            say(f"load it with: from transformers import {auto_class}; "
                f"{auto_class}.from_pretrained({str(report.output)!r})")
    except KeyboardInterrupt as interruption:  # the merge itself is complete
        raise OutputInPlace(report.output) from interruption
