"""LoRA adapter inputs given their base: the entry's `base`, else the adapter's own
`base_model_name_or_path` where it opens here, else the recipe's `[base]` (a merge's; collect-stats
opens each model alone, without it)."""

from __future__ import annotations

from typing import Any

from mergecli.errors import CheckpointError, MergecliError
from mergecli.io.adapters import Adapted
from mergecli.io.checkpoint import Checkpoint, open_checkpoint


def with_bases(specs: list[Any], opened: list[Checkpoint], recipe_base: Checkpoint | None, *,
               headers_only: bool = False, fetcher: Any = None) -> list[Any]:
    """`opened` (one per spec, in order), each adapter replaced by its base with the adapter applied.

    Raises:
        CheckpointError: an adapter whose base is not found, or does not fit it.
    """
    out: list[Any] = []
    for spec, checkpoint in zip(specs, opened):
        settings = getattr(checkpoint, "adapter", None)
        if settings is None:
            out.append(checkpoint)
            continue
        base = None
        if spec.base is not None:
            base = open_checkpoint(spec.base, headers_only=headers_only, fetcher=fetcher)
        elif settings.get("base_model_name_or_path"):
            try:
                base = open_checkpoint(str(settings["base_model_name_or_path"]), headers_only=headers_only,
                                       fetcher=fetcher)
            except MergecliError:
                base = None  # a path of the machine it was trained on, or a hub model not here: the recipe's
        base = base or recipe_base
        if base is None:
            named = settings.get("base_model_name_or_path")
            raise CheckpointError(checkpoint.source, f"is a LoRA adapter, and its base was not found (its "
                                                     f"base_model_name_or_path {named!r} does not open here, and "
                                                     "the recipe has no [base])",
                                  hint="set `base = PATH` on its [[models]] entry, or give the recipe a [base]")
        out.append(Adapted(base, checkpoint, settings, checkpoint.source))
    return out


def open_model(spec: Any, **options: Any) -> Any:
    """A recipe entry's checkpoint (`open_checkpoint` with its revision), an adapter applied to its base."""
    checkpoint = open_checkpoint(spec.path, revision=spec.revision, **options)
    try:
        return with_bases([spec], [checkpoint], None, headers_only=options.get("headers_only", False),
                          fetcher=options.get("fetcher"))[0]
    except BaseException:
        checkpoint.close()
        raise
