"""Does mergecli agree with mergekit 0.1.5? Task arithmetic, TIES and SLERP of the same inputs, both in
float32, tensor by tensor: the fraction of elements that differ and the largest difference.

The inputs: a LLaMA-shaped base (hidden 256, 4 layers, float32) and two fine-tunes of it (small random
changes). mergekit runs from its own venv (`make mergekit-venv`); each merge is written as a mergekit
config, and the same config goes through `mergecli convert` and `mergecli merge`.

Usage: python benchmarks/compare_mergekit.py [WORKDIR]   (default bench-out/compare)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from builders import llama_config  # noqa: E402

CONFIGS = {
    "task_arithmetic": "merge_method: task_arithmetic\nparameters:\n  lambda: 0.8\n",
    "ties": "merge_method: ties\nparameters:\n  density: 0.4\n  normalize: true\n",
    "slerp": "merge_method: slerp\nparameters:\n  t: 0.3\n",
}


def build(work: Path) -> tuple[Path, list[Path]]:
    from transformers import LlamaForCausalLM

    base = work / "base"
    if not (base / "model.safetensors").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(llama_config(hidden=256, intermediate=512, layers=4, vocab_size=1024)).save_pretrained(base)
    tensors = load_file(base / "model.safetensors")
    models = []
    for i in range(2):
        path = work / f"ft{i}"
        if not (path / "model.safetensors").exists():
            path.mkdir(parents=True, exist_ok=True)
            generator = torch.Generator().manual_seed(10 + i)
            tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
            save_file(tuned, path / "model.safetensors", metadata={"format": "pt"})
            (path / "config.json").write_text((base / "config.json").read_text())
        models.append(path)
    return base, models


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/compare").resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(os.environ.get("MERGEKIT_VENV", "bench-out/mergekit-venv")).resolve()
    mergekit = venv / "bin" / "mergekit-yaml"
    if not mergekit.exists():
        raise SystemExit(f"no mergekit at {mergekit}: run `make mergekit-venv` first")
    base, models = build(work)
    print("| method | tensors | elements | elements that differ | fraction | largest difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, text in CONFIGS.items():
        entries = [base, *models] if method != "slerp" else [models[0], models[1]]
        config = work / f"{method}.yml"
        lines = [text, f"base_model: {entries[0]}", "dtype: float32", "models:"]
        lines += [f"  - model: {path}\n    parameters:\n      weight: {0.6 if i == 1 else 0.4}"
                  if method != "slerp" and path != entries[0] else f"  - model: {path}"
                  for i, path in enumerate(entries)]
        config.write_text("\n".join(lines) + "\n")
        theirs, ours = work / f"mergekit-{method}", work / f"mergecli-{method}"
        subprocess.run([str(mergekit), str(config), str(theirs), "--allow-crimes", "--quiet"], check=True,
                       cwd=work, capture_output=True)
        recipe = subprocess.run([sys.executable, "-m", "mergecli", "convert", str(config)], check=True,
                                capture_output=True, text=True).stdout
        (work / f"{method}.toml").write_text(recipe)
        subprocess.run([sys.executable, "-m", "mergecli", "merge", str(work / f"{method}.toml"), "-o", str(ours),
                        "--force", "-q"], check=True)
        a = {k: v for f in sorted(theirs.glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted(ours.glob("*.safetensors")) for k, v in load_file(f).items()}
        differ = total = 0
        largest = 0.0
        for name, value in b.items():
            other = a[name].to(value.dtype)
            total += value.numel()
            differ += int((value != other).sum())
            largest = max(largest, float((value.double() - other.double()).abs().max()))
        print(f"| {method} | {len(b)} | {total:,} | {differ:,} | {differ / total:.2e} | {largest:.3g} |")


if __name__ == "__main__":
    main()
