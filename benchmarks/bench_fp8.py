"""`make bench-fp8`: `mergecli average` of fp8 block-scaled checkpoints (DeepSeek-V3's layout), fp8 → fp8,
against the same merge of bf16 checkpoints of the same shapes, and against the published route: convert
every fp8 input to a bf16 copy first (DeepSeek's fp8_cast_bf16.py, here on the CPU), then merge the copies.

The three bf16 inputs are bench-average's (LLaMA-shaped, hidden 2048, 8 layers, vocabulary 32000, ~1 GB
each); the fp8 ones are them with every linear weight of the layers quantized to float8_e4m3fn with a
float32 `weight_scale_inv` per 128 × 128 tile (transformers' formula), the rest bf16. Each contender runs
in a child process under `/usr/bin/time -v`, REPEATS rounds in turn, page cache warm; the best wall and
work times are reported, and the peak RSS above a process that only imports mergecli and torch.

Usage: python benchmarks/bench_fp8.py [WORKDIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_average as B  # noqa: E402  (the same model set, measure and warm)

TILE = 128

# DeepSeek's published conversion (inference/fp8_cast_bf16.py), on the CPU: each shard loaded, each fp8
# weight multiplied by its tile's scale and saved as bf16, shard by shard
CONVERT = """
import json, os, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
started = time.perf_counter()
for source in map(Path, sys.argv[1:]):
    target = source.parent / (source.name + "-bf16")
    target.mkdir(exist_ok=True)
    for file in sorted(source.glob("*.safetensors")):
        tensors = load_file(file)
        out = {}
        for name, value in tensors.items():
            if name.endswith("weight_scale_inv"):
                continue
            if value.dtype == torch.float8_e4m3fn:
                scale = tensors[name.removesuffix(".weight") + ".weight_scale_inv"]
                value = (value.float() * scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).to(torch.bfloat16)
            out[name] = value
        save_file(out, target / file.name, metadata={"format": "pt"})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("weight_scale_inv")}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((source / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
open(os.environ["BENCH_WORK_FILE"], "w").write(str(time.perf_counter() - started))
"""


def quantize_checkpoint(source: Path, target: Path) -> None:
    """`source` (bf16) with its layers' linear weights in fp8 block-scaled, as transformers' Fp8Quantize
    writes them (448 / max|w| per tile; its inverse stored)."""
    if (target / "config.json").exists():
        return
    target.mkdir(parents=True)
    weight_map = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors, out = load_file(file), {}
        for name, value in tensors.items():
            if ".layers." in name and name.endswith("proj.weight"):
                rows, cols = value.shape
                tiles = value.float().reshape(rows // TILE, TILE, cols // TILE, TILE)
                largest = tiles.abs().amax(dim=(1, 3))
                scale = torch.where(largest > 0, 448 / largest, 1.0)
                out[name] = (tiles * scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(
                    rows, cols)
                out[name.removesuffix(".weight") + ".weight_scale_inv"] = 1.0 / scale
            else:
                out[name] = value
        save_file(out, target / file.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file.name))
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [TILE, TILE]}
    (target / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", default="bench-out", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    work = options.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    _, _, baseline_rss = B.measure([sys.executable, "-c", B.BASELINE], work / "work-seconds")
    plain = [work / f"vocab32000-{i}" for i in range(3)]
    for seed, path in enumerate(plain):
        subprocess.run([sys.executable, B.__file__, "--build", str(path), "32000", str(seed)], check=True)
    fp8 = [work / f"fp8-{i}" for i in range(3)]
    for source, target in zip(plain, fp8):
        subprocess.run([sys.executable, __file__, "--quantize", str(source), str(target)], check=True)
    out = work / "out-fp8"
    out.mkdir(exist_ok=True)
    py = sys.executable

    def average(models: list[Path], name: str) -> list[str]:
        return [py, "-c", B.MERGECLI, "average", *[a for m in models for a in ("-m", str(m))], "--quiet",
                "--set", "shard_size=5GB", "-o", str(out / name)]

    runs = {
        "mergecli average, bf16 inputs → bf16": (average(plain, "bf16"), plain, out / "bf16"),
        "mergecli average, fp8 block inputs → fp8 block": (average(fp8, "fp8"), fp8, out / "fp8"),
        "published route, step 1: each fp8 input converted to a bf16 copy": (
            [py, "-c", CONVERT, *map(str, fp8)], fp8, None),
    }
    results: dict[str, list[tuple]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(options.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            command, inputs, output = runs[name]
            B.warm(inputs)
            results[name].append(B.measure(command, work / "work-seconds"))
            print(f"{name}: wall {results[name][-1][0]:.2f} s", file=sys.stderr)
            if output is not None:
                B.remove(output)
    for path in fp8:
        shutil.rmtree(path.parent / (path.name + "-bf16"), ignore_errors=True)
    best = {name: (min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs) - baseline_rss)
            for name, runs in results.items()}
    bf16 = best["mergecli average, bf16 inputs → bf16"]
    convert = best["published route, step 1: each fp8 input converted to a bf16 copy"]
    best["published route, both steps (the conversion, then the bf16 merge)"] = (
        convert[0] + bf16[0], convert[1] + bf16[1], max(convert[2], bf16[2]))
    sizes = {label: sum(f.stat().st_size for f in models[0].glob("*.safetensors")) / B.MB
             for label, models in (("bf16", plain), ("fp8", fp8))}
    print(f"\ninputs: 3 × {sizes['bf16']:.0f} MB bf16, 3 × {sizes['fp8']:.0f} MB fp8 block-scaled; best of "
          f"{options.repeats} rounds; baseline RSS (import mergecli + torch) {baseline_rss:.0f} MB\n")
    print("| contender | wall s | wall ÷ bf16 average | work s | work ÷ bf16 average | peak RSS − baseline (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (wall, work_s, rss) in best.items():
        print(f"| {name} | {wall:.2f} | {wall / bf16[0]:.2f} | {work_s:.2f} | {work_s / bf16[1]:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--quantize"]:
        quantize_checkpoint(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
