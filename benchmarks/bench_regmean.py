"""`make bench-regmean`: memory, time and disk of RegMean statistics and of a RegMean++ merge.

Builds LLaMA-shaped bf16 checkpoints (hidden 2048, intermediate 5632, vocab 32000: the shape the
issue measured) at 2 and at 12 layers, with a word tokenizer, and calibration data of 32 examples,
then measures in child processes, one run after another:

  - `regmean collect-stats` of one model: peak RSS (`/usr/bin/time -v`) and wall time, against a
    plain forward pass of the same model over the same batches (transformers `from_pretrained`,
    the whole model in memory, the same batches; both end to end, process start included);
  - the statistics' bytes on disk, against what format version 1 (full float64 matrices) stored;
  - `regmean merge` with `sequential = true` (RegMean++) of two models: peak RSS and wall time,
    against plain forwards of both models.

Usage: python benchmarks/bench_regmean.py [WORKDIR] [--layers 2,12] [--examples 32] [--length 256]
       (default WORKDIR: bench-out/regmean; about 6 GB of disk, 10-15 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from builders import word_tokenizer  # noqa: E402  (the tests' word tokenizer, any vocabulary size)

MB = 10**6
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 4

# A plain forward pass over exactly the batches collect-stats runs (its own batching code), timed
# from process start like the CLI: load the whole model with transformers, run every batch.
FORWARD = """
import sys, time
from pathlib import Path
import torch, transformers
from mergecli.methods.registry import method_of
from mergecli import load_recipe
from mergecli.stats.calibration import model_batches, read_examples
recipe = load_recipe(sys.argv[1])
method_of(recipe)
settings = recipe.settings
for spec in recipe.models:
    model = transformers.AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()
    data = read_examples(spec.data, num_examples=settings.num_examples)
    batches, _ = model_batches(data, Path(spec.path), batch_size=settings.batch_size,
                               max_length=settings.max_length, max_positions=None)
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(**batch.inputs)
    print("forward_seconds", time.perf_counter() - started)
    del model
"""


def build_llama(path: Path, layers: int, seed: int) -> Path:
    """A LLaMA checkpoint of random bf16 weights (norms at 1), written directly with safetensors."""
    if (path / "config.json").exists():
        return path
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN).bfloat16(),
               "lm_head.weight": weight(VOCAB, HIDDEN)}
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN).bfloat16(),
            p + "self_attn.q_proj.weight": weight(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": weight(kv, HIDDEN),
            p + "self_attn.v_proj.weight": weight(kv, HIDDEN), p + "self_attn.o_proj.weight": weight(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": weight(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": weight(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": weight(HIDDEN, INTERMEDIATE),
        })
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                         architectures=["LlamaForCausalLM"], dtype="bfloat16")
    config.save_pretrained(path)
    word_tokenizer(VOCAB).save_pretrained(path)
    return path


def write_data(path: Path, examples: int, length: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(f"w{rng.randrange(40, VOCAB)}" for _ in range(rng.randint(length // 2, length)))
             for _ in range(examples)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(path: Path, models: list[Path], data: list[Path], args: argparse.Namespace, **regmean) -> Path:
    lines = ['method = "regmean"', 'output = "merged"', "", "[regmean]", f"num_examples = {args.examples}",
             f"batch_size = {args.batch}", f"max_length = {args.length}", 'stats_dir = "stats"',
             *(f"{key} = {json.dumps(value)}" for key, value in regmean.items())]
    for i, (model, file) in enumerate(zip(models, data)):
        lines += ["", "[[models]]", f'path = "{model}"', f'name = "m{i}"', f'data = "{file}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one child process; RSS from `/usr/bin/time -v`."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    kbytes = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, kbytes * 1024 / MB, result.stdout


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_v1_bytes(stats: Path) -> int:
    """What format version 1 stored for the same statistics: every Gram as a full d×d float64 matrix."""
    meta = json.loads((stats / "stats.json").read_text())
    return sum(8 * e["in_features"] ** 2 for e in meta["grams"].values()) + (stats / "stats.json").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", default=str(ROOT / "bench-out" / "regmean"))
    parser.add_argument("--layers", default="2,12")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", default="collect,merge,plusplus", help="which of collect, merge, plusplus")
    args = parser.parse_args()
    runs = set(args.runs.split(","))
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mergecli = [sys.executable, "-m", "mergecli"]
    data = [write_data(work / f"data-{i}.txt", args.examples, args.length, seed=i) for i in range(2)]
    rows = []
    for layers in (int(n) for n in args.layers.split(",")):
        models = [build_llama(work / f"llama-{layers}l-{i}", layers, seed=i) for i in range(2)]
        case = work / f"{layers}-layers"
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        one = write_recipe(case / "one.toml", models[:1], data[:1], args)
        if "collect" in runs:
            wall, rss, _ = measure([*mergecli, "regmean", "collect-stats", str(one), "--quiet"])
            forward_wall, forward_rss, out = measure([sys.executable, "-c", FORWARD, str(one)])
            stats = case / "stats" / "m0"
            rows.append((layers, "collect-stats (1 model)", wall, rss, forward_wall, forward_rss,
                         directory_bytes(stats), format_v1_bytes(stats)))
        two = write_recipe(case / "two.toml", models, data, args)
        if runs & {"merge", "plusplus"}:
            both_wall, both_rss, _ = measure([sys.executable, "-c", FORWARD, str(two)])
        if "merge" in runs:
            subprocess.run([*mergecli, "regmean", "collect-stats", str(two), "--quiet"], check=True,
                           capture_output=True)
            rm_wall, rm_rss, _ = measure([*mergecli, "regmean", "merge", str(two), "--quiet", "--force"])
            rows.append((layers, "RegMean merge (2 models, from stats)", rm_wall, rm_rss, both_wall, both_rss, 0, 0))
        if "plusplus" in runs:
            pp = write_recipe(case / "pp.toml", models, data, args, sequential=True)
            pp_wall, pp_rss, _ = measure([*mergecli, "regmean", "merge", str(pp), "--quiet", "--force"])
            rows.append((layers, "RegMean++ merge (2 models)", pp_wall, pp_rss, both_wall, both_rss, 0, 0))
        print(f"{layers} layers done", file=sys.stderr)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}; LLaMA bf16, hidden {HIDDEN}, intermediate {INTERMEDIATE}, vocab {VOCAB}; "
          f"{args.examples} examples of {args.length // 2}-{args.length} tokens, batch {args.batch}\n")
    print("| layers | run | wall s | peak RSS MB | plain forward wall s | forward peak RSS MB | time ÷ forward "
          "| stats on disk MB | format v1 MB | disk ÷ v1 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layers, run, wall, rss, fwall, frss, disk, v1 in rows:
        disk_cols = f"{disk / MB:.1f} | {v1 / MB:.1f} | {disk / v1:.3f}" if v1 else "- | - | -"
        print(f"| {layers} | {run} | {wall:.1f} | {rss:.0f} | {fwall:.1f} | {frss:.0f} | {wall / fwall:.2f} "
              f"| {disk_cols} |")
    by_run = {}
    for layers, run, _, rss, *_ in rows:
        by_run.setdefault(run, []).append((layers, rss))
    for run, points in by_run.items():
        if len(points) > 1:
            (few, low), (many, high) = points[0], points[-1]
            print(f"\n{run}: peak RSS at {many} layers ÷ at {few} layers = {high / low:.2f}")


if __name__ == "__main__":
    main()
