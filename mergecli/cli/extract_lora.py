"""`mergecli extract-lora`: any fine-tune written as a PEFT LoRA adapter of its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergecli.cli._console import info, result
from mergecli.cli._errors import report_errors
from mergecli.cli._options import ForceOpt, JsonOpt, QuietOpt


@report_errors
def extract_lora(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="The fine-tune (a path or a hub repo id).",
                                         show_default=False)],
    base: Annotated[str, typer.Option("--base", metavar="BASE", help="Its base model.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The adapter's folder.", show_default=False)],
    rank: Annotated[int | None, typer.Option("--rank", "-r", min=1, help="The rank of every matrix's factors.")] = None,
    error: Annotated[float | None, typer.Option(
        "--error", "-e", min=0.0, max=1.0,
        help="The least rank per matrix whose relative error ‖Δ − B·A‖ / ‖Δ‖ is at most this (--rank: at most).",
    )] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Write MODEL's difference from BASE as a PEFT LoRA adapter: a truncated SVD of each matrix's
    difference, one tensor at a time (each tensor's relative error in the card), and every other tensor
    that differs (a norm, a bias) saved whole (modules_to_save). `PeftModel.from_pretrained(base, DIR)`
    loads it.

    Examples:

    \b
      mergecli extract-lora merged/ --base meta-llama/Llama-3.1-8B --rank 32 -o adapter/
      mergecli extract-lora my-finetune/ --base base/ --error 0.05 -o adapter/
    """
    from mergecli.errors import UsageError
    from mergecli.merge.lora_run import extract

    if rank is None and error is None:
        raise UsageError("give --rank or --error (with both, --rank caps the rank --error asks for)",
                         hint="e.g. --rank 16, or --error 0.05")
    report = extract(model, base, output, rank=rank, error=error, force=force)
    result(report, lambda: info(f"adapter of {report['tensors']} tensors ({report['factored']} as LoRA factors, "
                                f"worst relative error {report['worst_error']:.2e}) → {output}"))
