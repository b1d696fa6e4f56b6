"""`combine-stats`: add up the statistics of one model collected in parts (other data, other
machines, a job scheduler instead of torchrun) into one statistics directory.

Gram sums, token counts and example counts add; the parts must come from the same model
(fingerprint and weights) and hook the same layers. One Gram is in memory at a time (two halves:
the running sum and the part being added), so combining needs no more memory than merging.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

from mergecli.errors import StatsError, UsageError
from mergecli.io.atomic import STATISTICS, atomic_directory, check_output_path
from mergecli.stats.grams import Packed
from mergecli.stats.store import ModelStats, StatsFiles, load_stats


@dataclass(frozen=True)
class CombineResult:
    directory: Path
    parts: int
    examples: int
    tokens: int
    grams: int
    bytes: int


def _same_model(first: ModelStats, other: ModelStats) -> str | None:
    """Why `other` cannot be added to `first`, or None."""
    if other.fingerprint != first.fingerprint or other.weights_sha256 != first.weights_sha256:
        return "are statistics of another model (fingerprint or weights differ)"
    shape = {w: (layer.gram, layer.orientation, layer.in_features) for w, layer in first.layers.items()}
    if {w: (layer.gram, layer.orientation, layer.in_features) for w, layer in other.layers.items()} != shape:
        return "hook other layers (collected with another mergecli or model class?)"
    return None


def combine_stats(output: Path | str, inputs: list[Path | str], *, force: bool = False) -> CombineResult:
    """Write into `output` the sum of the statistics in `inputs` (each a `stats_dir/<model>`).

    Raises:
        UsageError: no input, `output` among the inputs, or `output` exists without `force`.
        StatsError: an input that is not statistics, or statistics of another model or layers.

    Example:
        >>> combine_stats("stats/math", ["part1/math", "part2/math"])
    """
    output = Path(output)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UsageError("nothing to combine", hint="give the statistics directories to add up")
    check_output_path(output, paths, force=force, kind=STATISTICS)
    parts = [load_stats(path, label=str(path)) for path in paths]
    first = parts[0]
    for path, other in zip(paths[1:], parts[1:]):
        problem = _same_model(first, other)
        if problem:
            raise StatsError(f"{path} and {paths[0]} {problem}; only statistics of one model add up")
    meta = copy.deepcopy(first.meta)
    meta["data"] = {"parts": [data for p in parts for data in p.data.get("parts", [p.data])]}
    meta["examples"] = sum(p.examples for p in parts)
    meta["tokens"] = sum(p.tokens for p in parts)
    for weight, entry in meta["layers"].items():
        entry["tokens"] = sum(p.layers[weight].tokens for p in parts)
    with atomic_directory(output, force=force, kind=STATISTICS) as temporary:
        parts_digest = hashlib.sha256("|".join(p.meta.get("data_sha256", "") for p in parts).encode()).hexdigest()
        files = StatsFiles(temporary, fingerprint=first.fingerprint, model=first.model, data_sha256=parts_digest)
        by_file: dict[Path, list[str]] = {}
        for key, entry in first.grams.items():
            by_file.setdefault(entry.file, []).append(key)
        for keys in by_file.values():  # one file per stage, as collected
            sums = {}
            for key in keys:
                total = first.read_packed(key)
                part = total.clone()
                for other in parts[1:]:
                    total.add_(other.read_packed(key, out=part))
                sums[key] = total
            files.add({key: Packed(total) for key, total in sums.items()},
                      {key: sum(p.grams[key].tokens for p in parts) for key in keys})
            files.wait()
            del sums
        size = files.finish(meta)
    return CombineResult(output, len(parts), meta["examples"], meta["tokens"], len(first.grams), size)
