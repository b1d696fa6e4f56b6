"""`make bench`: memory and speed of `mergecli average` against the copy floor and the naive merge.

Builds three LLaMA-shaped bf16 checkpoints of about 1 GB (hidden 2048, 8 layers, intermediate 5632,
vocab 32000, 500 MB input shards) and three with a 128256-token vocabulary, then measures, in one
run, for each set:
  - peak RSS (`/usr/bin/time -v`) minus that of a process that only imports
    mergecli and torch;
  - wall time divided by the copy floor: one process that reads every input tensor with safetensors
    and writes an output of the same size;
  - the same two figures for the naive merge (load every state dict, average, save_file).

Usage: python benchmarks/bench_average.py [WORKDIR]   (default: bench-out/, ~15 GB of disk)
"""

from __future__ import annotations

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

BASELINE = "import torch, mergecli.cli.app"

COPY_FLOOR = """
import sys, json
from pathlib import Path
from safetensors import safe_open
models, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
def handles(path):
    return [safe_open(f, "pt") for f in sorted(path.glob("*.safetensors"))]
opened = [handles(m) for m in models]
with open(out, "wb") as sink:
    for name in [k for h in opened[0] for k in h.keys()]:
        tensors = [next(h for h in hs if name in h.keys()).get_tensor(name) for hs in opened]
        sink.write(tensors[0].view(-1).view(__import__("torch").uint8).numpy().tobytes())
"""

NAIVE = """
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
models, out = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
states = []
for m in models:
    state = {}
    for f in sorted(m.glob("*.safetensors")):
        state.update(load_file(f))
    states.append(state)
merged = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}
save_file(merged, out, metadata={"format": "pt"})
"""


def llama_shapes(vocab: int, hidden: int = 2048, layers: int = 8, inter: int = 5632) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
            p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_checkpoint(path: Path, shapes: dict[str, tuple], seed: int, shard_bytes: int = 500 * MB) -> None:
    """Random bf16 weights in ~500 MB shards with an index, written one shard at a time."""
    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
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
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "torch_dtype": "bfloat16"}))


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one child process, RSS from `/usr/bin/time -v`.

    The child is started by `time` (a small process), not forked from this one: a child forked
    from a large parent inherits the parent's high-water RSS through exec.
    """
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    kbytes = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)
    return wall, int(kbytes) * 1024 / MB


REPEATS = 3  # each figure is the median wall time (and the largest peak RSS) of this many runs


def measure_median(command: list[str], cleanup: Path) -> tuple[float, float]:
    runs = []
    for _ in range(REPEATS):
        runs.append(measure(command))
        if cleanup.is_dir():
            shutil.rmtree(cleanup)
        else:
            cleanup.unlink(missing_ok=True)
    walls = sorted(wall for wall, _ in runs)
    return walls[len(walls) // 2], max(rss for _, rss in runs)


def run_set(label: str, models: list[Path], work: Path, baseline_rss: float) -> list[tuple]:
    out = work / f"out-{label.replace(' ', '')}"
    py = sys.executable
    for path in models:  # warm the page cache so that every contender reads from memory
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as f:
                while f.read(64 * MB):
                    pass
    floor_wall, floor_rss = measure_median([py, "-c", COPY_FLOOR, *map(str, models), str(work / "copy.bin")],
                                           work / "copy.bin")
    args = [a for m in models for a in ("-m", str(m))]
    shutil.rmtree(out, ignore_errors=True)
    command = [py, "-m", "mergecli", "average", *args, "-o", str(out), "--quiet", "--set", "shard_size=5GB"]
    measure(command)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    shutil.rmtree(out)
    ours_wall, ours_rss = measure_median(command, out)
    naive_wall, naive_rss = measure_median([py, "-c", NAIVE, *map(str, models), str(work / "naive.safetensors")],
                                           work / "naive.safetensors")
    size = sum(f.stat().st_size for f in models[0].glob("*.safetensors")) / MB
    return [
        (label, f"{len(models)} x {size:.0f} MB", "mergecli average", ours_wall, ours_wall / floor_wall,
         ours_rss - baseline_rss, f"{len(shards)} output shard(s)"),
        (label, "", "naive (load all, average, save_file)", naive_wall, naive_wall / floor_wall,
         naive_rss - baseline_rss, ""),
        (label, "", "copy floor (read all, write one)", floor_wall, 1.0, floor_rss - baseline_rss, ""),
    ]


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    sets = {"vocab 32000": llama_shapes(32000), "vocab 128256": llama_shapes(128256)}
    rows = []
    _, baseline_rss = measure([sys.executable, "-c", BASELINE])
    for label, shapes in sets.items():
        models = [work / f"{label.replace(' ', '')}-{i}" for i in range(3)]
        for seed, path in enumerate(models):  # in a child: this process must stay small
            subprocess.run([sys.executable, __file__, "--build", str(path), str(shapes["model.embed_tokens.weight"][0]),
                            str(seed)], check=True)
        rows.extend(run_set(label, models, work, baseline_rss))
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}; baseline RSS (import mergecli + torch) {baseline_rss:.0f} MB; "
          f"median of {REPEATS} runs\n")
    print("| model set | inputs | method | wall s | wall / copy floor | peak RSS − baseline (MB) | note |")
    print("|---|---|---|---:|---:|---:|---|")
    for label, inputs, method, wall, ratio, rss, note in rows:
        print(f"| {label} | {inputs} | {method} | {wall:.1f} | {ratio:.2f} | {rss:.0f} | {note} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        build_checkpoint(Path(sys.argv[2]), llama_shapes(int(sys.argv[3])), int(sys.argv[4]))
    else:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out"))
