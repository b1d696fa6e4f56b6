"""What every merge command does once it has a recipe: bind it and plan (merge/job.py, merge/plan.py),
then print the plan (dry run) or run it with progress, summarize, say how to load the result, and push
it when the recipe asks."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mergecli.cli._console import interactive, plural, say, set_mode
from mergecli.cli._heavy import import_torch
from mergecli.cli._render import human_bytes, print_plan, print_report, progress
from mergecli.errors import OutputInPlace

if TYPE_CHECKING:
    from mergecli.merge.plan import MergePlan
    from mergecli.recipe import Recipe


def plan_and_run(recipe: Recipe, command: str, *, output: Path | None, force: bool, dry_run: bool,
                 sync: bool = True, device: str = "cpu", resume: bool = False) -> None:
    """Dry run: print the plan. Otherwise merge, report, and push if the recipe asks."""
    from mergecli.merge.job import Job

    job = Job(recipe)
    if not dry_run:
        job.start_streaming(output, force=force)  # headers read while torch imports
    try:
        import_torch("mergecli.merge.plan", "mergecli.merge.run", "mergecli.stats.collect")
        from mergecli.merge.plan import plan_merge

        job.bind(command=command, push=not dry_run)
        plan = plan_merge(job, output=output, force=force or dry_run, dry_run=dry_run, sync=sync, device=device,
                          resume=resume)
    except BaseException:
        job.close()
        raise
    from mergecli.stats.collect import process_rank

    if process_rank()[0] != 0:  # under torchrun, rank 0 speaks for every process
        set_mode(quiet=True)
    if dry_run:
        try:
            print_plan(plan, title=f"{recipe.method} (dry run: nothing written)")
        finally:
            plan.inputs.close()
        return
    merge_and_report(plan)
    if recipe.push_to_hub and process_rank()[0] == 0:
        from mergecli.cli.push import push_after_merge

        push_after_merge(plan.output, recipe)


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
        if plan.recipe.output_format == "lora":
            say("load it with: from peft import PeftModel; PeftModel.from_pretrained(BASE_MODEL, "
                f"{str(report.output)!r})")
        elif plan.support.pipeline_from is not None:  # a sentence-transformers model: its pipeline is in the output
            say("load it with: from sentence_transformers import SentenceTransformer; "
                f"SentenceTransformer({str(report.output)!r})")
        elif plan.support.config is not None:
            auto_class = loader_class(plan.support.config)
            say(f"load it with: from transformers import {auto_class}; "
                f"{auto_class}.from_pretrained({str(report.output)!r})")
    except KeyboardInterrupt as interruption:  # the merge itself is complete
        raise OutputInPlace(report.output) from interruption
