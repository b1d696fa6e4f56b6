"""Rendering of plans, reports and progress."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mergecli.cli._console import err_console, info, interactive, out_console, warn
from mergecli.merge import MergePlan, MergeReport

KIND_LABELS = {
    "average": "averaged",
    "regmean": "RegMean (linear weights)",
    "head": "head, copied from {ref}",
    "exclude": "excluded, copied from {ref}",
    "integer": "integer, copied from {ref}",
}


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def _reference(plan: MergePlan) -> str:
    return "base" if plan.inputs.base else plan.recipe.models[0].name


def print_plan(plan: MergePlan, *, title: str) -> None:
    """The dry-run / validate view of a plan, on stdout."""
    recipe = plan.recipe
    table = Table(title=title, title_justify="left", show_header=True)
    table.add_column("model")
    table.add_column("weight", justify="right")
    table.add_column("tensors", justify="right")
    table.add_column("size", justify="right")
    table.add_column("path", overflow="fold")
    if plan.inputs.base:
        base = plan.inputs.base
        table.add_row("base", "-", str(len(base.tensors)), human_bytes(base.nbytes), base.source)
    for spec, weight, ckpt in zip(recipe.models, recipe.weights, plan.inputs.models):
        table.add_row(spec.name, f"{weight:.4g}", str(len(ckpt.tensors)), human_bytes(ckpt.nbytes), ckpt.source)
    out_console.print(table)
    reference = _reference(plan)
    for kind, count in plan.counts().items():
        out_console.print(f"  {count:>6} tensors {KIND_LABELS.get(kind, kind).format(ref=reference)}")
    out_console.print(f"  output      {plan.output}  ({len(plan.shards)} shard{'s' * (len(plan.shards) > 1)})")
    out_console.print(f"  read        {human_bytes(plan.bytes_read)}")
    out_console.print(f"  write       {human_bytes(plan.bytes_written)}")
    out_console.print(f"  peak memory ~{human_bytes(plan.peak_memory)} above the interpreter")
    for message in plan.warnings:
        warn(message)


def print_report(report: MergeReport, reference: str) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("output", str(report.output))
    table.add_row("tensors", ", ".join(
        f"{n} {KIND_LABELS.get(k, k).format(ref=reference)}" for k, n in report.counts.items()))
    table.add_row("shards", str(report.shards))
    table.add_row("read", human_bytes(report.bytes_read))
    table.add_row("written", human_bytes(report.bytes_written))
    rate = report.bytes_read / report.seconds if report.seconds else 0
    table.add_row("time", f"{report.seconds:.1f} s ({human_bytes(rate)}/s read)")
    out_console.print(table)
    for message in report.warnings:
        warn(message)


@contextmanager
def progress_bar(description: str, *, total_bytes: int, total_items: int, quiet: bool,
                 item_name: str = "tensors") -> Iterator[Callable[[int, int], None]]:
    """Yield a callback `(items done, bytes done)` that draws a Rich bar, or logs plain lines."""
    if interactive(quiet):
        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TextColumn("{task.fields[items]}"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=err_console, transient=False) as progress:
            task = progress.add_task(description, total=total_bytes, items=f"0/{total_items} {item_name}")

            def update(items: int, done: int) -> None:
                progress.update(task, completed=done, items=f"{items}/{total_items} {item_name}")

            yield update
        return

    started = time.monotonic()
    last = {"time": started, "tenth": -1}
    info(f"{description}: {total_items} {item_name}, {human_bytes(total_bytes)}")

    def log(items: int, done: int) -> None:
        tenth = int(10 * done / total_bytes) if total_bytes else 10
        now = time.monotonic()
        finished = items == total_items
        if finished or (tenth > last["tenth"] and now - last["time"] >= 1) or now - last["time"] >= 10:
            last.update(time=now, tenth=tenth)
            info(f"{description}: {100 * done / max(total_bytes, 1):3.0f}% "
                 f"({human_bytes(done)}, {items}/{total_items} {item_name}, {now - started:.0f} s)")

    yield log
