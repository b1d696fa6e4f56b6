"""`make bench-rounding`: how often each method's output is off the correctly rounded float64 result.

Builds a LLaMA-shaped base (hidden 384, intermediate 1024, 8 layers, vocabulary 8000: about 20M
parameters) and three fine-tunes in two precisions: bf16 fine-tunes a few units from their base (a long
fine-tune's typical distance, where exact results often fall on a rounding boundary), and float32 ones.
Every method runs through the CLI (the settings of tests/test_method_formulas.py) and is compared with its
formula computed in float64 (tests/formulas.py) and rounded once: the share of elements off, per output
dtype, and for float32 outputs the most units off. mergekit 0.1.5 runs the deterministic methods it has on
the bf16 set, for comparison.

Usage: python benchmarks/bench_rounding.py [WORKDIR]   (default WORKDIR: bench-out/rounding; ~10 minutes)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import test_method_formulas as cases  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

MERGEKIT = {"average": ("linear", True), "task_arithmetic": ("task_arithmetic", False), "ties": ("ties", False),
            "model_stock": ("model_stock", False), "breadcrumbs": ("breadcrumbs", False), "sce": ("sce", False),
            "karcher": ("karcher", False), "multislerp": ("multislerp", False), "nearswap": ("nearswap", False),
            "ram": ("ram", False)}
MERGEKIT_PARAMETERS = {"task_arithmetic": "  lambda: 0.7\n", "ties": "  density: 0.4\n",
                       "breadcrumbs": "  density: 0.6\n  gamma: 0.1\n", "sce": "  select_topk: 0.5\n",
                       "nearswap": "  t: 0.004\n", "ram": "  epsilon: 0.008\n"}


def family(root: Path, dtype: torch.dtype, noise: float) -> dict:
    if not (root / "base" / "model.safetensors").exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=8000, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                             num_attention_heads=6, num_key_value_heads=6, tie_word_embeddings=False)
        LlamaForCausalLM(config).to(dtype).save_pretrained(root / "base")
        base = load_file(root / "base" / "model.safetensors")
        for i in range(3):
            generator = torch.Generator().manual_seed(100 + i)
            tuned = {k: (v.double() + noise * torch.randn(v.shape, generator=generator, dtype=torch.float64))
                     .to(dtype).contiguous() for k, v in base.items()}
            (root / f"ft{i}").mkdir(parents=True, exist_ok=True)
            (root / f"ft{i}" / "config.json").write_text((root / "base" / "config.json").read_text())
            save_file(tuned, root / f"ft{i}" / "model.safetensors", metadata={"format": "pt"})
    return {"base": root / "base", "models": [root / f"ft{i}" for i in range(3)]}


def share_off(got: dict, want: dict) -> tuple[float, int]:
    off = total = worst = 0
    for name, value in want.items():
        units = cases.units_off(got[name], value)
        off += int((units > 0).sum())
        total += units.numel()
        worst = max(worst, int(units.max()))
    return off / total, worst


def mergekit_share(work: Path, fam: dict, case: str, want: dict) -> str:
    method, linear = MERGEKIT[case]
    table, _, count, with_base, _ = cases.CASES[case]
    weights = cases.WEIGHTS[:count] if case in cases.WEIGHTED else [1.0] * count
    lines = [f"merge_method: {method}", "dtype: bfloat16"] + ([f"base_model: {fam['base']}"] if with_base else [])
    if case in MERGEKIT_PARAMETERS:
        lines.append("parameters:\n" + MERGEKIT_PARAMETERS[case].rstrip())
    lines.append("models:")
    for path, weight in zip(fam["models"][:count], weights):
        lines.append(f"  - model: {path}\n    parameters: {{weight: {weight}}}")
    config = work / f"mk-{case}.yml"
    config.write_text("\n".join(lines) + "\n")
    venv = Path(os.environ.get("MERGEKIT_VENV", ROOT / "bench-out" / "mergekit-venv"))
    out = work / f"mk-{case}"
    result = subprocess.run([str(venv / "bin" / "mergekit-yaml"), str(config), str(out), "--allow-crimes"],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        return "failed"
    got = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    return f"{100 * share_off(got, want)[0]:.3f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", nargs="?", default=str(ROOT / "bench-out" / "rounding"), type=Path)
    options = parser.parse_args()
    work = options.work.resolve()
    families = {"bfloat16": family(work / "bf16", torch.bfloat16, 3e-4),
                "float32": family(work / "f32", torch.float32, 0.01)}
    rows = []
    for case in cases.CASES:
        row = [case]
        for inputs, dtype in cases.OUTPUTS:
            place = work / "runs" / f"{case}-{inputs}-{dtype}"
            place.mkdir(parents=True, exist_ok=True)
            got, want = cases.run(place, families[inputs], case, dtype)
            share, worst = share_off(got, want)
            row.append(f"{100 * share:.3f}%" + (f" (≤ {worst})" if dtype == "auto" and inputs == "float32" else ""))
            if inputs == "bfloat16":
                row.append(mergekit_share(work, families["bfloat16"], case, want) if case in MERGEKIT else "")
        rows.append(row)
        print(" | ".join(row), file=sys.stderr)
    print("\nShare of elements off the correctly rounded float64 result (float32 → float32: and the most units "
          "off); ~20M parameters\n")
    print("| method | float32 → float32 | float32 → fp16 | float32 → bf16 | bf16 → bf16 | mergekit 0.1.5, bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
