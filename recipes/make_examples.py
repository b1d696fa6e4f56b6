"""Build the example checkpoints the demo recipes merge: two tiny fine-tunes of one LLaMA.

Usage: python recipes/make_examples.py recipes/examples
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from builders import build_llama  # noqa: E402  (the tests' builders: one definition of a tiny LLaMA)

EXAMPLES = {"llama-base": 0, "llama-math": 1, "llama-code": 2}


def main(target: Path) -> None:
    for name, seed in EXAMPLES.items():
        path = target / name
        if (path / "model.safetensors").exists():
            continue
        build_llama(path, seed=seed, dtype=torch.bfloat16)
        print(f"built {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "recipes/examples"))
