"""The example RegMean recipe in recipes/ runs as `make demo-regmean` runs it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
import transformers

from clirunner import cli
from references import load_dir

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_regmean_example_recipe(tmp_path):
    recipes = tmp_path / "recipes"  # the recipe writes to ../demo-out: keep that inside tmp_path
    recipes.mkdir()
    for path in RECIPES.glob("regmean-*"):
        shutil.copyfile(path, recipes / path.name)
    spec = importlib.util.spec_from_file_location("make_examples", RECIPES / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    make_examples.main(recipes / "examples")

    recipe = recipes / "regmean-llama.toml"
    result = cli("regmean", "collect-stats", recipe)
    assert result.exit_code == 0, result.output
    assert "24 examples" in result.output
    result = cli("regmean", "merge", recipe)
    assert result.exit_code == 0, result.output
    out = tmp_path / "demo-out" / "llama-regmean"
    merged, base = load_dir(out), load_dir(recipes / "examples" / "llama-base")
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])  # excluded: from [base]
    assert merged["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[2, 4, 5, 6]])).logits.float()).all()
