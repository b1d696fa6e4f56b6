"""RegMean benchmark: the cost of collecting statistics, their size, and the memory of the merge.

Builds two LLaMA-shaped fp32 checkpoints on the fly (default: hidden 768, 6 layers, intermediate
2048, 12 heads / 3 KV heads, vocab 8000: about 50M parameters) and calibration data of 64
examples of up to 256 tokens, then prints:

  - collect-stats throughput (real tokens/s) of the forward pass with the Gram hooks, against a
    plain forward pass over the same padded batches (target: at most 1.6× its time);
  - the statistics' size on disk, with shared-input deduplication (q/k/v and gate/up read one
    Gram matrix) and without;
  - `mergecli regmean merge` wall time and peak RSS (a child process, VmHWM / getrusage) above a
    process that only imports mergecli and torch, against the size of one layer's n Gram matrices
    and against `mergecli average` of the same models (the streaming loop's own buffers).

Usage: python benchmarks/bench_regmean.py [WORKDIR] [--hidden 768] [--layers 6] [--intermediate 2048]
       [--vocab 8000] [--examples 64] [--length 256] [--batch 8] [--repeats 3]
       (default WORKDIR: bench-out/regmean; about 300 MB of disk, a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from builders import word_tokenizer  # noqa: E402  (the tests' tiny tokenizer, any vocabulary size)
from mergecli.recipe import load_recipe  # noqa: E402
from mergecli.regmean.calibration import pad_id, read_examples, text_batches, tokenize_examples  # noqa: E402
from mergecli.regmean.collect import StatsSession, compute_dtype, load_model, plan_stats  # noqa: E402
from mergecli.regmean.grams import GramCollector  # noqa: E402
from mergecli.regmean.layers import find_linear_layers  # noqa: E402

MB = 10**6
# A child's getrusage(RUSAGE_SELF).ru_maxrss starts at its parent's peak on Linux (kept across fork
# and exec), so the child reports its own high-water mark (VmHWM) where /proc has it.
MEASURE = """
import re, resource, runpy, sys
sys.argv = ["mergecli", *sys.argv[1:]]
if len(sys.argv) > 1:
    try:
        runpy.run_module("mergecli", run_name="__main__")
    except SystemExit as exit:
        if exit.code:
            raise
else:
    import torch, mergecli.cli.app  # the baseline: what every mergecli process imports
try:
    kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
except OSError:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("maxrss_kb", kb)
"""


def build_models(work: Path, args: argparse.Namespace) -> list[Path]:
    dtype = getattr(torch, args.dtype)
    heads = args.hidden // 64  # head size 64, 4 query heads per key/value head
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 4,
                         max_position_embeddings=2 * args.length, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    paths = []
    for seed in range(2):
        path = work / f"llama-{args.dtype}-{seed}"
        if not (path / "config.json").exists():
            torch.manual_seed(seed)
            LlamaForCausalLM(config).to(dtype).save_pretrained(path)
            word_tokenizer(args.vocab).save_pretrained(path)
        paths.append(path)
    return paths


def write_data(work: Path, args: argparse.Namespace) -> list[Path]:
    paths = []
    for seed in range(2):
        rng = random.Random(seed)
        lengths = [rng.randint(args.length // 2, args.length) for _ in range(args.examples)]
        lines = [" ".join(f"w{rng.randrange(40, args.vocab)}" for _ in range(n)) for n in lengths]
        path = work / f"data-{seed}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def write_recipe(work: Path, models: list[Path], data: list[Path], args: argparse.Namespace) -> Path:
    recipe = work / "recipe.toml"
    text = ['method = "regmean"', f'output = "{work / "merged"}"', "", "[regmean]",
            f'stats_dir = "{work / "stats"}"', f"num_examples = {args.examples}", f"batch_size = {args.batch}",
            f"max_length = {args.length}"]
    for i, (model, path) in enumerate(zip(models, data)):
        text += ["", "[[models]]", f'path = "{model}"', f'name = "m{i}"', f'data = "{path}"']
    recipe.write_text("\n".join(text) + "\n")
    return recipe


def batches_of(model_dir: Path, data: Path, args: argparse.Namespace) -> list:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = read_examples(data, num_examples=args.examples).examples
    token_ids = tokenize_examples(examples, tokenizer, max_length=args.length)
    return list(text_batches(token_ids, batch_size=args.batch, pad_token_id=pad_id(tokenizer)))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_forward(model: torch.nn.Module, batches: list, collector: GramCollector | None = None) -> float:
    with torch.inference_mode():
        model(**batches[0].inputs)  # warm-up, not timed
        synchronize()
        started = time.perf_counter()
        for batch in batches:
            if collector:
                collector.begin_batch(batch.mask)
            model(**batch.inputs)
        if collector:
            collector.finish()
        synchronize()
        return time.perf_counter() - started


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def child_maxrss(*args: str) -> tuple[int, float]:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if run.returncode:
        raise SystemExit(f"child failed:\n{run.stdout}\n{run.stderr}")
    kb = int(run.stdout.strip().splitlines()[-1].split()[-1])
    return kb * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", nargs="?", default=str(ROOT / "bench-out" / "regmean"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the checkpoints")
    for name, default in [("hidden", 768), ("layers", 6), ("intermediate", 2048), ("vocab", 8000),
                          ("examples", 64), ("length", 256), ("batch", 8), ("repeats", 3)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"torch {torch.__version__}, {where}; {args.dtype} checkpoints; work dir {work}")

    models = build_models(work, args)
    data = write_data(work, args)
    recipe_path = write_recipe(work, models, data, args)
    recipe = load_recipe(recipe_path)

    # 1. Hooks + Grams against a plain forward pass, same model, same padded batches.
    from mergecli.io.checkpoint import open_checkpoint

    with open_checkpoint(str(models[0])) as checkpoint:
        model = load_model(models[0], dtype=compute_dtype(checkpoint, args.device), device=args.device, label="m0")
        layers, _ = find_linear_layers(model, checkpoint.tensors)
    dtype = next(model.parameters()).dtype
    batches = [b.to(next(model.parameters()).device, dtype) for b in batches_of(models[0], data[0], args)]
    tokens = sum(int(b.mask.sum()) for b in batches)
    padded = sum(b.mask.numel() for b in batches)
    # alternate the two, three times each, and keep the best: a shared 2-core machine is noisy
    plain = hooked = float("inf")
    for _ in range(args.repeats):
        plain = min(plain, time_forward(model, batches))
        with GramCollector(model, layers) as collector:
            hooked = min(hooked, time_forward(model, batches, collector))
    params = sum(p.numel() for p in model.parameters())
    del model
    print(f"\nmodel: {params / 1e6:.1f}M parameters ({dtype}), {len(layers)} linear layers; "
          f"data: {len(batches)} batches, {tokens} real tokens ({padded} with padding)")
    print(f"plain forward      {plain:7.2f} s  {tokens / plain:9.0f} tokens/s   (best of {args.repeats})")
    print(f"collect (hooks)    {hooked:7.2f} s  {tokens / hooked:9.0f} tokens/s   throughput ratio "
          f"{(tokens / hooked) / (tokens / plain):.2f}: {hooked / plain:.2f}× the forward time (target ≤ 1.6×)")

    # 2. Statistics on disk, with and without shared-input deduplication (end to end, both models).
    shutil.rmtree(work / "stats", ignore_errors=True)
    shutil.rmtree(work / "stats-nodedupe", ignore_errors=True)
    started = time.perf_counter()
    with StatsSession(args.device) as session:
        for job in plan_stats(recipe, force=True):
            session.collect(job)
    collect_seconds = time.perf_counter() - started
    nodedupe = load_recipe(recipe_path, overrides=[f'regmean.stats_dir="{work / "stats-nodedupe"}"'])
    with StatsSession(args.device) as session:
        job = plan_stats(nodedupe, models=["m0"], force=True)[0]
        session.collect(job, share_inputs=False)
    with_dedupe = directory_bytes(work / "stats" / "m0")
    without = directory_bytes(work / "stats-nodedupe" / "m0")
    print(f"\ncollect-stats, 2 models end to end (load, run, save): {collect_seconds:.1f} s")
    print(f"stats per model on disk: {with_dedupe / MB:8.1f} MB with shared-input dedupe, "
          f"{without / MB:8.1f} MB without ({without / with_dedupe:.2f}×)")

    # 3. The merge in a child process: wall time and peak RSS above the import baseline.
    baseline, _ = child_maxrss()
    rss, seconds = child_maxrss("regmean", "merge", str(recipe_path), "--force", "--quiet")
    average_rss, average_seconds = child_maxrss("average", "-m", str(models[0]), "-m", str(models[1]),
                                                "-o", str(work / "averaged"), "--force", "--quiet")
    largest = max(args.hidden, args.intermediate)
    one_layer = 2 * largest * largest * 8
    from mergecli.merge.plan import plan_merge

    plan = plan_merge(recipe, force=True)
    estimate = plan.peak_memory
    plan.inputs.close()
    model_bytes = directory_bytes(models[0]) - sum(p.stat().st_size for p in models[0].glob("*.json"))
    print(f"\nregmean merge: {seconds:.1f} s wall (process start included)")
    print(f"peak RSS {rss / MB:.0f} MB, baseline (imports) {baseline / MB:.0f} MB → "
          f"{(rss - baseline) / MB:.0f} MB for the merge; `mergecli average` of the same models: "
          f"{(average_rss - baseline) / MB:.0f} MB, {average_seconds:.1f} s")
    print(f"one layer's Grams (2 models × {largest}² float64) = {one_layer / MB:.0f} MB; "
          f"plan's peak estimate {estimate / MB:.0f} MB; one model checkpoint {model_bytes / MB:.0f} MB; "
          f"all Grams of one model {with_dedupe / MB:.0f} MB")


if __name__ == "__main__":
    main()
