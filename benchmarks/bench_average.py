"""`make bench-average`: speed and memory of `mergecli average` against the copy floor, mergekit
and the naive merge.

Builds three LLaMA-shaped bf16 checkpoints of about 1 GB (hidden 2048, 8 layers, intermediate 5632,
vocab 32000, 500 MB input shards) and three with a 128256-token vocabulary, then, for each set, runs
every contender in turn, REPEATS rounds (each round starting with the next contender), each in a
child process started by `/usr/bin/time -v` in the work directory:

  - mergecli average (one 5 GB output shard, like the floor), durable by default (fsync before the
    output is put in place), and with --no-sync;
  - the copy floor: one process that reads every byte of every input file (`readinto` one reused
    1 MB buffer) and writes an output of the same size (the first input's bytes as read), nothing
    parsed or computed: the least any merge must do. (Reading "every tensor with safetensors" is no
    floor: `get_tensor` maps the file and reads nothing until touched, and copying each mapped
    tensor out is slower than `read`.); and the same floor with an fsync of its output at the end,
    the floor of a durable merge;
  - mergekit's linear merge (`mergekit-yaml`), when a separate venv has it (`MERGEKIT_VENV`,
    default bench-out/mergekit-venv; kept out of mergecli's dependencies);
  - the naive merge (load every state dict, average, save_file).

The page cache is warm (every input read again just before each run; `sync` before each run, so
that the writeback of an earlier output does not land in a later run) and two times are reported
per run: the whole process (`wall`) and the `work`, from just after the imports to the end, which
each child reports itself. Import time (~1.2 s for torch) is the same for everyone and hides the
arithmetic in `wall` ratios; `work` ratios show it. Each figure is the best of the rounds; ratios
are to the copy floor's figure of the same run. Peak RSS is `/usr/bin/time -v`'s maximum resident
set size minus that of a process that only imports mergecli and torch.

Usage: python benchmarks/bench_average.py [WORKDIR] [--repeats 5] [--sets 32000,128256]
       (default WORKDIR: bench-out/, ~20 GB of disk; MERGECLI_BEFORE=/path/to/an/earlier/checkout
       adds that mergecli as a contender)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

MB = 10**6
HIDDEN, LAYERS, INTERMEDIATE, HEADS, KV_HEADS = 2048, 8, 5632, 16, 16

BASELINE = "import torch, mergecli.cli.app"
# The task-vector methods, with the settings their rows use (models[0] is the base, the other two merged)
# The other methods: name → (its settings, in TOML; how many of models[1:] it merges; whether models[0] is its
# base). mergekit runs each with the same settings (in YAML), when its venv is there.
METHODS = {"task_arithmetic": ("lambda = 1.0", 2, True), "ties": ("density = 0.5", 2, True),
           "dare_ties": ("density = 0.5", 2, True), "slerp": ("t = 0.5", 2, False),
           "model_stock": ("", 2, True), "della": ("density = 0.5\nepsilon = 0.1", 2, True),
           "della_linear": ("density = 0.5\nepsilon = 0.1", 2, True),
           "breadcrumbs": ("density = 0.5\ngamma = 0.01", 2, True),
           "breadcrumbs_ties": ("density = 0.5\ngamma = 0.01", 2, True), "sce": ("select_topk = 0.5", 2, True),
           "karcher": ("", 2, False), "nuslerp": ("", 2, True), "multislerp": ("", 2, True),
           "nearswap": ("t = 0.001", 1, True), "arcee_fusion": ("", 1, True), "ram": ("", 2, True),
           "ramplus_tl": ("", 2, True)}
WEIGHTED = {"task_arithmetic", "ties", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties",
            "nuslerp", "multislerp"}  # mergekit requires their models' weight

# Each child writes its work time (seconds after its imports) to the file named by BENCH_WORK_FILE.
# mergecli runs through its command's entry point, which ends the process itself (os._exit, after the
# output is in place): the work time is written on the way out.
MERGECLI = """
import os, sys, time
import torch, mergecli.cli.app, mergecli.merge.run
import mergecli.__main__ as entry
started = time.perf_counter()
def record():
    open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
exit_now = entry._exit_now
entry._exit_now = lambda code: (record(), exit_now(code))
sys.argv = ["mergecli", *sys.argv[1:]]
try:
    entry.main()
except SystemExit as done:  # an earlier checkout's entry point (MERGECLI_BEFORE) returns this way
    if done.code:
        raise
record()
"""

COPY_FLOOR = """
import os, sys, time
from pathlib import Path
import torch
started = time.perf_counter()
models, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
buffer = memoryview(bytearray(2**20))  # cache-sized: larger buffers copy slower
with open(out, "wb", buffering=0) as sink:
    for index, model in reversed(list(enumerate(models))):
        for file in sorted(model.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as source:
                while read := source.readinto(buffer):
                    if index == 0:
                        sink.write(buffer[:read])
    if os.environ.get("BENCH_SYNC") == "1":  # on disk before it is called done, as mergecli's output
        os.fsync(sink.fileno())
        os.fsync(os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY))
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""

MERGEKIT = """
import os, sys, time
import torch
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
import yaml
started = time.perf_counter()
config = MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1])))
run_merge(config, sys.argv[2], options=MergeOptions(out_shard_size=5 * 10**9, copy_tokenizer=False,
                                                   write_model_card=False, quiet=True, lazy_unpickle=True))
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""

NAIVE = """
import os, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
started = time.perf_counter()
models, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
states = []
for m in models:
    state = {}
    for f in sorted(m.glob("*.safetensors")):
        state.update(load_file(f))
    states.append(state)
merged = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
save_file(merged, out, metadata={"format": "pt"})
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""


def llama_shapes(vocab: int) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, HIDDEN)}
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        })
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (vocab, HIDDEN)
    return shapes


def write_config(path: Path, vocab: int) -> None:
    """A complete LLaMA config (mergekit reads the layer count and sizes from it)."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)


def build_checkpoint(path: Path, vocab: int, seed: int, shard_bytes: int = 500 * MB) -> None:
    """Random bf16 weights in ~500 MB shards with an index, written one shard at a time."""
    if not (path / "model.safetensors.index.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        shards, current, size = [], {}, 0
        for name, shape in llama_shapes(vocab).items():
            nbytes = 2 * torch.Size(shape).numel()
            if current and size + nbytes > shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = shape
            size += nbytes
        shards.append(current)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, start=1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {n: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for n, s in shard.items()}
            save_file(tensors, path / filename, metadata={"format": "pt"})
            total += sum(t.nbytes for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, filename))
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_config(path, vocab)


ADDED_TOKENS = 300  # the union contender: tokens one model (a chat fine-tune, say) added


def write_tokenizer(path: Path, vocab: int, added: int = 0) -> None:
    """A word-level tokenizer.json of `vocab` tokens, and `added` special tokens after them."""
    from tokenizers import AddedToken, Tokenizer, models

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.add_special_tokens([AddedToken(f"<added-{i}>", special=True) for i in range(added)])
    tokenizer.save(str(path / "tokenizer.json"))


def build_added(source: Path, path: Path, vocab: int, added: int) -> None:
    """`source` with `added` rows appended to its embedding and head (random), and its tokenizer's
    added tokens: the checkpoint of a fine-tune that added tokens. Shards without those tensors are
    hard links to the source's."""
    from safetensors import safe_open

    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    index = json.loads((source / "model.safetensors.index.json").read_text())
    grown = {"model.embed_tokens.weight", "lm_head.weight"}
    generator = torch.Generator().manual_seed(99)
    for shard in sorted(set(index["weight_map"].values())):
        names = [n for n, f in index["weight_map"].items() if f == shard]
        if not grown & set(names):
            os.link(source / shard, path / shard)
            continue
        with safe_open(source / shard, "pt") as f:
            tensors = {n: f.get_tensor(n) for n in names}
        for name in grown & set(names):
            extra = (torch.randn(added, tensors[name].shape[1], generator=generator) * 0.02).to(torch.bfloat16)
            tensors[name] = torch.cat([tensors[name], extra])
        save_file(tensors, path / shard, metadata={"format": "pt"})
        del tensors
    total = sum((path / f).stat().st_size for f in set(index["weight_map"].values()))
    index["metadata"]["total_size"] = total
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_config(path, vocab + added)
    write_tokenizer(path, vocab, added)


def measure(command: list[str], work_file: Path, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall seconds, work seconds, peak RSS in MB) of one child process.

    The child is started by `time` (a small process), not forked from this one: a child forked
    from a large parent inherits the parent's high-water RSS through exec.
    """
    os.sync()
    work_file.unlink(missing_ok=True)
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=work_file.parent,  # not the checkout:
                            # `python -c` puts its working directory first on sys.path
                            env={**os.environ, **(env or {}), "BENCH_WORK_FILE": str(work_file)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)
    work = float(work_file.read_text()) if work_file.exists() else float("nan")
    return wall, work, int(kbytes) * 1024 / MB


def mergekit_python() -> str | None:
    venv = Path(os.environ.get("MERGEKIT_VENV", "bench-out/mergekit-venv"))
    python = venv.absolute() / "bin" / "python"  # children run in the work directory
    if python.exists() and subprocess.run([str(python), "-c", "import mergekit"], capture_output=True).returncode == 0:
        return str(python)
    return None


def contenders(models: list[Path], work: Path, label: str) -> dict[str, tuple[list[str], Path, dict]]:
    """name → (command, what it writes, environment)."""
    py = sys.executable
    out = work / f"out-{label}"
    args = [a for m in models for a in ("-m", str(m))]
    merge = ["average", *args, "--quiet", "--set", "shard_size=5GB", "-o"]
    floor = [py, "-c", COPY_FLOOR, *map(str, models), str(out / "copy.bin")]
    runs = {
        "mergecli average": ([py, "-c", MERGECLI, *merge, str(out / "mergecli")], out / "mergecli", {}),
        "copy floor (read all, write one)": (floor, out / "copy.bin", {}),
        "mergecli average --no-sync": ([py, "-c", MERGECLI, *merge, str(out / "nosync"), "--no-sync"],
                                       out / "nosync", {}),
        "copy floor, fsync at the end": (floor, out / "copy.bin", {"BENCH_SYNC": "1"}),
    }
    for method, (table, count, based) in METHODS.items():  # models[0] as the base, the others merged
        recipe = work / f"{method}-{label}.toml"
        entries = models[1:1 + count]
        recipe.write_text(f'method = "{method}"\nshard_size = "5GB"\n'
                          + (f'[base]\npath = "{models[0]}"\n' if based else "")
                          + f"[{method}]\n{table}\n" + "".join(f'[[models]]\npath = "{m}"\n' for m in entries))
        runs[f"mergecli {method}"] = ([py, "-c", MERGECLI, "merge", str(recipe), "-q", "-o", str(out / method)],
                                      out / method, {})
    added = work / f"{label}-2-added"
    if added.exists():  # the third model with tokens added: the output's vocabulary is the union
        recipe = work / f"union-{label}.toml"
        recipe.write_text('tokenizer = "union"\nshard_size = "5GB"\n'
                          + "".join(f'[[models]]\npath = "{m}"\n' for m in (*models[:2], added)))
        runs[f"mergecli average, tokenizer = union (+{ADDED_TOKENS} tokens in one model)"] = (
            [py, "-c", MERGECLI, "average", str(recipe), "-q", "-o", str(out / "union")], out / "union", {})
    before = os.environ.get("MERGECLI_BEFORE")  # a checkout of an earlier mergecli, to compare with
    if before:
        runs["mergecli average, earlier checkout"] = ([py, "-c", MERGECLI, *merge, str(out / "before")],
                                                      out / "before", {"PYTHONPATH": before})
    mergekit = mergekit_python()
    if mergekit:
        config = work / f"mergekit-{label}.yml"
        config.write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters:\n      weight: 1.0\n" for m in models))
        runs["mergekit 0.1.5 linear (mergekit-yaml)"] = ([mergekit, "-c", MERGEKIT, str(config), str(out / "mergekit")],
                                                         out / "mergekit", {})
        for method, (table, count, based) in METHODS.items():
            config = work / f"mergekit-{method}-{label}.yml"
            entries = models[1:1 + count]
            base = f"base_model: {models[0] if based else entries[0]}\n" if based or method == "slerp" else ""
            weight = "    parameters:\n      weight: 1.0\n" if method in WEIGHTED else ""
            parameters = "".join(f"  {key.strip()}: {value.strip()}\n" for key, value in
                                 (line.split("=") for line in table.splitlines()))
            config.write_text(f"merge_method: {method}\ndtype: bfloat16\n{base}"
                              + (f"parameters:\n{parameters}" if parameters else "") + "models:\n"
                              + "".join(f"  - model: {m}\n{weight}" for m in entries))
            runs[f"mergekit 0.1.5 {method}"] = ([mergekit, "-c", MERGEKIT, str(config), str(out / f"mk-{method}")],
                                                out / f"mk-{method}", {})
    runs["naive (load all, average, save_file)"] = ([py, "-c", NAIVE, *map(str, models), str(out / "naive.st")],
                                                    out / "naive.st", {})
    return runs


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def warm(models: list[Path]) -> None:
    """Read every input file, so that the next contender reads from memory. Done before each run:
    this machine's kernel (DAMON) pages out page cache left idle for about a minute."""
    for path in models:
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(64 * MB):
                    pass


def run_set(label: str, models: list[Path], work: Path, repeats: int, only: list[str]) -> dict[str, list[tuple]]:
    runs = {name: run for name, run in contenders(models, work, label).items()
            if not only or "copy floor" in name or any(word in name for word in only)}
    (work / f"out-{label}").mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):  # rounds: every contender once per round, in turn, starting
        # each round with the next one (what ran just before a run changes its time on this VM)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            command, output, env = runs[name]
            warm(models)
            results[name].append(measure(command, work / "work-seconds", env))
            print(f"{label} {name}: wall {results[name][-1][0]:.2f} s, work {results[name][-1][1]:.2f} s",
                  file=sys.stderr)
            remove(output)
    return results


def hot_path(rounds: int = 30) -> list[tuple[str, float]]:
    """The combine alone, in memory, on one thread: (what, best ms) per 4M elements of three bf16
    inputs with weights 1/3 each (no I/O, so the page cache and the disk cannot hide it; 4M, the
    earlier block size, so that the figures compare with the earlier per-block profile)."""
    from mergecli.methods.average import CHUNK_ELEMENTS, weighted_sum

    torch.set_num_threads(1)  # as in each streaming worker
    n = 4 * 2**20
    inputs = [torch.randn(n, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16) for i in range(3)]
    out, scratch, accumulator = torch.empty(n, dtype=torch.bfloat16), torch.empty(CHUNK_ELEMENTS), torch.empty(n)

    def one_pass_per_operation() -> None:  # the combine before the fused loop
        accumulator.copy_(inputs[0])
        accumulator.mul_(1.0)
        for x in inputs[1:]:
            accumulator.add_(x, alpha=1.0)
        accumulator.div_(3.0)
        out.copy_(accumulator)

    def copies() -> None:  # each input block copied into the output buffer: bytes moved, no arithmetic
        for x in inputs:
            out.copy_(x)

    candidates = {
        "copy each input block into the output buffer (no arithmetic)": copies,
        "weighted sum, fused chunks (mergecli now)": lambda: weighted_sum(inputs, [1.0] * 3, divisor=3.0,
                                                                           out=out, scratch=scratch),
        "weighted sum, one pass per operation (earlier)": one_pass_per_operation,
    }
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):  # alternated, so that a noisy moment hits every candidate alike
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return [(name, seconds * 1e3) for name, seconds in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", default="bench-out", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sets", default="32000,128256",
                        help="vocabulary sizes of the model sets (\"\": the in-memory combine only)")
    parser.add_argument("--only", default="",
                        help="contenders whose name contains one of these words (comma-separated; the copy floor "
                             "always runs)")
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _, _, baseline_rss = measure([sys.executable, "-c", BASELINE], work / "work-seconds")
    rows = []
    for vocab in map(int, filter(None, options.sets.split(","))):
        label = f"vocab{vocab}"
        models = [work / f"{label}-{i}" for i in range(3)]
        for seed, path in enumerate(models):  # in a child: this process must stay small
            subprocess.run([sys.executable, __file__, "--build", str(path), str(vocab), str(seed)], check=True)
        if vocab == 128256:  # the union contender's inputs: tokenizers, and a model with tokens added
            subprocess.run([sys.executable, __file__, "--build-added", str(work), str(vocab)], check=True)
        size = sum(f.stat().st_size for f in models[0].glob("*.safetensors")) / MB
        results = run_set(label, models, work, options.repeats, [w for w in options.only.split(",") if w])
        floor = results["copy floor (read all, write one)"]
        floor_wall, floor_work = min(r[0] for r in floor), min(r[1] for r in floor)
        for name, runs in results.items():
            wall, work_s, rss = min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs)
            rows.append((f"vocab {vocab}", f"3 x {size:.0f} MB", name, wall, wall / floor_wall, work_s,
                         work_s / floor_work, rss - baseline_rss))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}; baseline RSS (import mergecli + torch) {baseline_rss:.0f} MB; "
          f"best of {options.repeats} rounds, page cache warm\n")
    print("| model set | inputs | contender | wall s | wall ÷ floor | work s | work ÷ floor | "
          "peak RSS − baseline (MB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, inputs, name, wall, wall_ratio, work_s, work_ratio, rss in rows:
        print(f"| {label} | {inputs} | {name} | {wall:.2f} | {wall_ratio:.2f} | {work_s:.2f} | {work_ratio:.2f} "
              f"| {rss:.0f} |")
    for label in dict.fromkeys(row[0] for row in rows):
        walls = {name: wall for set_label, _, name, wall, *_ in rows if set_label == label}
        if "copy floor, fsync at the end" in walls and "mergecli average --no-sync" in walls:
            print(f"\n{label}: mergecli average (durable) ÷ copy floor with fsync = "
                  f"{walls['mergecli average'] / walls['copy floor, fsync at the end']:.2f}; "
                  f"mergecli average ÷ mergecli average --no-sync = "
                  f"{walls['mergecli average'] / walls['mergecli average --no-sync']:.2f}")
        if "mergecli average" in walls:
            ratios = ", ".join(f"{name.removeprefix('mergecli ')} {walls[name] / walls['mergecli average']:.2f}"
                               for name in walls if name.startswith("mergecli ") and name.split()[1] in METHODS)
            print(f"{label}: wall ÷ mergecli average: {ratios}")
    timings = hot_path()
    print("\nThe combine alone, in memory, one thread, per block of 4M elements of three bf16 inputs (best of 30):\n")
    print("| combine | ms per block | ÷ copies |")
    print("|---|---:|---:|")
    for name, ms in timings:
        print(f"| {name} | {ms:.2f} | {ms / timings[0][1]:.2f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build_checkpoint(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1:2] == ["--build-added"]:
        root, size = Path(sys.argv[2]), int(sys.argv[3])
        for i in range(3):
            write_tokenizer(root / f"vocab{size}-{i}", size)
        build_added(root / f"vocab{size}-2", root / f"vocab{size}-2-added", size, ADDED_TOKENS)
    else:
        main()
