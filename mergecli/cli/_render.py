"""Rendering of plans, reports and progress: tables on stdout, one progress renderer on stderr."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from mergecli.cli._console import clean, err_console, info, interactive, mode, note, out_console, plural, result, warn
from mergecli.io.blocks import block_of

if TYPE_CHECKING:
    from mergecli.merge.plan import MergePlan
    from mergecli.merge.run import MergeReport
    from mergecli.methods.base import Method

KIND_LABELS = {
    "average": "averaged",
    "head": "head, copied from {ref}",
    "exclude": "excluded, copied from {ref}",
    "integer": "integer, copied from {ref}",
}
Update = Callable[..., None]  # (units done, a few words[, units in all when it changes][, step=the step running])


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def kinds_line(counts: dict[str, int], method: Method, reference: str) -> list[str]:
    """"21 averaged", "1 head, copied from base", ...: what was done to how many tensors."""
    labels = {**KIND_LABELS, **method.kinds}
    return [f"{n} {labels.get(kind, kind).format(ref=reference)}" for kind, n in counts.items()]


def plan_data(plan: MergePlan) -> dict:
    """The plan, for --json."""
    varying = {key: [{"value": value, "tensors": len(names), "names": names} for value, names in values.items()]
               for key, values in plan.varying.items()}
    return {"dry_run": True, "method": plan.recipe.method, "output": str(plan.output),
            "tensors": len(plan.tasks), "counts": plan.counts(), "shards": len(plan.shards),
            "bytes_read": plan.bytes_read, "bytes_written": plan.bytes_written, "peak_memory": plan.peak_memory,
            "varying": varying, "stages": [stage.recipe.name for stage in plan.stage_plans],
            "warnings": plan.warnings, "notes": plan.notes}


def tensor_group(names: list[str]) -> str:
    """A group of tensors in a few words: `layers 0-1 (14 tensors), model.norm.weight`."""
    layers = sorted({block[1] for name in names if (block := block_of(name)) is not None})
    outside = [name for name in names if block_of(name) is None]
    runs, start = [], None
    for index, layer in enumerate(layers):
        start = layer if start is None else start
        if index + 1 == len(layers) or layers[index + 1] != layer + 1:
            runs.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    words = [f"layer{'s' * (len(layers) > 1)} {', '.join(runs)} ({plural(len(names) - len(outside), 'tensor')})"] \
        if layers else []
    words += outside[:3] + ([f"and {len(outside) - 3} more"] if len(outside) > 3 else [])
    return ", ".join(words)


def print_plan(plan: MergePlan, *, title: str) -> None:
    """The dry-run / validate view of a plan: on stdout (or its --json), warnings on stderr."""
    result(plan_data(plan), lambda: _print_plan(plan, title))
    for message in plan.notes:
        note(message)
    for message in plan.warnings:
        warn(message)


def _print_plan(plan: MergePlan, title: str) -> None:
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
    for spec, weight, ckpt in zip(recipe.models, plan.method.shown_weights(recipe), plan.inputs.models):
        table.add_row(spec.name, weight, str(len(ckpt.tensors)), human_bytes(ckpt.nbytes), ckpt.source)
    out_console.print(table)
    for line in kinds_line(plan.counts(), plan.method, plan.reference_name):
        count, label = line.split(" ", 1)
        out_console.print(f"  {count:>6} {'tensor' if count == '1' else 'tensors'} {label}")
    for key, values in plan.varying.items():
        out_console.print(f"  {key} varies by tensor:")
        for value, names in values.items():
            out_console.print(f"    {value:>10}  {tensor_group(names)}")
    if plan.stage_plans:
        out_console.print(f"  stages      {', '.join(stage.recipe.name for stage in plan.stage_plans)} (written to "
                          "scratch first, then removed)")
    out_console.print(f"  output      {plan.output} ({plural(len(plan.shards), 'shard')})")
    out_console.print(f"  read        {human_bytes(plan.bytes_read)}")
    out_console.print(f"  write       {human_bytes(plan.bytes_written)}")
    out_console.print(f"  peak memory ~{human_bytes(plan.peak_memory)} above the interpreter")


def print_report(report: MergeReport, method: Method, reference: str) -> None:
    """A finished merge: a summary on stdout (or its --json), warnings on stderr."""
    files = sorted(p.name for p in report.output.iterdir() if not p.name.startswith(".")) \
        if report.output.is_dir() else []
    data = {"output": str(report.output), "files": files, "tensors": report.tensors, "counts": report.counts,
            "shards": report.shards, "bytes_read": report.bytes_read, "bytes_written": report.bytes_written,
            "seconds": round(report.seconds, 3), "warnings": report.warnings, "notes": report.notes}
    if report.fetched:
        data["fetched"] = report.fetched
    result(data, lambda: _print_report(report, method, reference))
    for message in report.notes:
        note(message)
    for message in report.warnings:
        warn(message)


def _print_report(report: MergeReport, method: Method, reference: str) -> None:
    rate = report.bytes_read / report.seconds if report.seconds else 0
    rows = {"output": str(report.output), "tensors": ", ".join(kinds_line(report.counts, method, reference)),
            "shards": str(report.shards), "read": human_bytes(report.bytes_read),
            "written": human_bytes(report.bytes_written),
            "time": f"{report.seconds:.1f} s ({human_bytes(rate)}/s read)"}
    if report.fetched:
        fetched = sum(report.fetched.values())
        rows["fetched"] = (f"{human_bytes(fetched)} from the Hub by range requests "
                           f"({human_bytes(fetched / report.seconds if report.seconds else 0)}/s), nothing stored")
    for label, value in rows.items():  # aligned lines, none ending in spaces
        out_console.print(Text.assemble((f"{label:<8}", "bold"), " ", clean(value)))


class Remaining:
    """The time left, from the rate of the last RATE_WINDOW seconds (not the average since the start: a
    streamed merge waits for its first bytes, then runs at the link's pace), said only once there is a
    rate to go by (MIN_SHARE of the work done, MIN_SECONDS gone)."""

    RATE_WINDOW, MIN_SHARE, MIN_SECONDS = 10.0, 0.05, 3.0

    def __init__(self, started: float):
        self.started = started
        self.samples: list[tuple[float, float]] = [(started, 0.0)]  # (time, work done)

    def words(self, now: float, done: float, total: float) -> str:
        """", about 12 s left", or nothing yet."""
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.RATE_WINDOW:
            self.samples.pop(0)
        if not total or done >= total or done < self.MIN_SHARE * total or now - self.started < self.MIN_SECONDS:
            return ""
        then, before = self.samples[0]
        if now <= then or done <= before:
            return ""
        left = (total - done) * (now - then) / (done - before)
        return f", about {left:.0f} s left" if left < 120 else f", about {left / 60:.0f} min left"


@contextmanager
def progress(description: str, *, total: float, unit: str = "bytes", what: str = "") -> Iterator[Update]:
    """Yield `update(done, detail)`: a Rich bar on a terminal, else a plain line per tenth of the work
    (and after 10 s without one) with the time left, or nothing with --quiet.

    Args:
        total: how many units make the whole job (0: not known yet; `update` can tell it later).
        unit: "bytes" (sizes and a transfer rate), "work" (an estimate of the work, in no unit of its
            own: shown as a share), or a counted noun ("blocks").
        what: a few words on the whole job, for the first plain line ("8 tensors").
    """
    if mode.quiet:
        yield lambda *args, **kwargs: None
        return
    if interactive():
        if unit == "bytes":
            counter: tuple = (DownloadColumn(), TransferSpeedColumn())
        elif unit == "work":
            counter = (TaskProgressColumn(),)
        else:
            counter = (MofNCompleteColumn(), TextColumn(unit))
        columns = (TextColumn("{task.description}", style="bold", markup=False), BarColumn(), *counter,
                   TextColumn("{task.fields[detail]}", markup=False), TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=False) as bar:
            task = bar.add_task(description, total=total or None, detail="")

            def draw(done: float, detail: str, total: float | None = None, step: str = "") -> None:
                words = ", ".join(filter(None, (detail, step)))
                bar.update(task, completed=done, detail=words, **({"total": total} if total else {}))

            yield draw
        return

    started = time.monotonic()
    state = {"time": started, "tenth": 0, "total": total, "step": ""}
    remaining = Remaining(started)

    def opening() -> None:
        size = {"bytes": human_bytes(state["total"]), "work": ""}.get(unit, f"{state['total']} {unit}")
        info(f"{description}: {', '.join(filter(None, (what, size)))}")

    if total:
        opening()

    def log(done: float, detail: str, total: float | None = None, step: str = "") -> None:
        if total and not state["total"]:
            state["total"] = total
            opening()
        total = state["total"]
        tenth = int(10 * done / total) if total else 0
        now = time.monotonic()
        left = remaining.words(now, done, total)
        finished = bool(total) and done >= total * (1 - 1e-9)
        if finished and state.get("finished"):
            return
        state["finished"] = finished
        # a line when a new tenth of the work is reached, at the end, and after 10 s without one
        if finished or tenth > state["tenth"] or now - state["time"] >= 10:
            state.update(time=now, tenth=max(tenth, state["tenth"]), step=step)
            amount = {"bytes": human_bytes(done), "work": ""}.get(unit, f"{done}/{total} {unit}")
            words = ", ".join(filter(None, (amount, detail, step, f"{now - started:.0f} s")))
            info(f"{description}: {100 * done / max(total, 1):3.0f}% ({words}{left})")

    yield log
