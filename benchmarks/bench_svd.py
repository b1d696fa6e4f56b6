"""`make bench-svd`: the matrix methods (TSV-M, Iso-C, Iso-CTS, WUDI) against their linear algebra alone.

Builds a base and two fine-tunes, LLaMA-shaped bf16 checkpoints of bench_average.py's shapes (hidden 2048,
intermediate 5632, vocabulary 32000) with LAYERS layers, then runs each method through the CLI in a child
started by `/usr/bin/time -v`, and, in another child, only the linear algebra the method does on the same
shapes (`torch.linalg.svd` of each task vector and of the gathered factors; for WUDI the Gram products,
the Cholesky factorization and the solves), on random matrices in memory: no reading, no writing, nothing
else. Reported: wall time, its ratio to the linear algebra alone, and peak RSS minus that of a process that
only imports mergecli and torch, beside the budget of 300 MB plus three times the largest tensor in float32.

Usage: python benchmarks/bench_svd.py [WORKDIR] [--layers 2]   (default WORKDIR: bench-out/svd)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_average as shapes  # noqa: E402

MB = 10**6
METHODS = {"tsv": "[tsv]", "iso_c": "[iso_c]", "iso_cts": "[iso_cts]", "wudi": "[wudi]"}

ALONE = """
import os, sys, time
import torch
method, count = sys.argv[1], int(sys.argv[2])
matrices = [tuple(map(int, s.split("x"))) for s in sys.argv[3:]]
started = time.perf_counter()
for rows, columns in matrices:
    m = min(rows, columns)
    vectors = [torch.randn(rows, columns) for _ in range(count)]
    if method in ("tsv", "iso_cts"):
        for vector in vectors:
            torch.linalg.svd(vector, full_matrices=False)
        keep = m // count * count if method == "tsv" else m
        torch.linalg.svd(torch.randn(rows, keep), full_matrices=False)
        torch.linalg.svd(torch.randn(keep, columns), full_matrices=False)
    if method in ("iso_c", "iso_cts"):
        torch.linalg.svd(sum(vectors), full_matrices=False)
    if method == "wudi":
        grams = sum((v.double().T @ v.double()) for v in vectors)
        moments = sum((v.double() @ (v.double().T @ v.double())) for v in vectors)
        factor = torch.linalg.cholesky(grams + torch.eye(columns, dtype=torch.float64))
        torch.cholesky_solve(moments.T, factor)
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", default="bench-out/svd", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shapes.LAYERS = options.layers
    vocab = 32000
    models = [work / f"model-{i}" for i in range(3)]
    for seed, path in enumerate(models):
        if not (path / "model.safetensors.index.json").exists():
            shapes.build_checkpoint(path, vocab, seed)
    matrices = [shape for shape in shapes.llama_shapes(vocab).values() if len(shape) == 2]
    largest = max(rows * columns for rows, columns in matrices) * 4 / MB
    _, _, baseline = shapes.measure([sys.executable, "-c", shapes.BASELINE], work / "work-seconds")
    rows = []
    for method, table in METHODS.items():
        recipe = work / f"{method}.toml"
        recipe.write_text(f'method = "{method}"\nshard_size = "5GB"\n[base]\npath = "{models[0]}"\n{table}\n'
                          + "".join(f'[[models]]\npath = "{m}"\n' for m in models[1:]))
        shapes.warm(models)
        wall, work_s, rss = shapes.measure([sys.executable, "-c", shapes.MERGECLI, "merge", str(recipe), "-q", "-o",
                                            str(work / f"out-{method}"), "--force"], work / "work-seconds")
        alone = shapes.measure([sys.executable, "-c", ALONE, method, "2", *(f"{r}x{c}" for r, c in matrices)],
                               work / "work-seconds")
        rows.append((method, wall, work_s, alone[1], rss - baseline))
        print(f"{method}: wall {wall:.1f} s, work {work_s:.1f} s, linear algebra alone {alone[1]:.1f} s, "
              f"peak RSS − baseline {rss - baseline:.0f} MB", file=sys.stderr)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; base + 2 fine-tunes "
          f"of {options.layers} layers (hidden 2048, intermediate 5632, vocabulary 32000, bf16); largest tensor "
          f"{largest:.0f} MB in float32, so the memory budget is {300 + 3 * largest:.0f} MB\n")
    print("| method | wall s | work s | linear algebra alone s | work ÷ alone | peak RSS − baseline (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, wall, work_s, alone, rss in rows:
        print(f"| {method} | {wall:.1f} | {work_s:.1f} | {alone:.1f} | {work_s / alone:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
