"""RegMean++ (`[regmean] sequential = true`) against least squares computed here, in float64, from
the merged blocks 0..l-1 (read back from the output) and each candidate's own block l."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from builders import build_clip_vision, build_llama
from clirunner import cli
from references import first_examples, image_inputs, load_dir, module_inputs, text_inputs, write_recipe

MAX_LENGTH = 16
SETTINGS = {"num_examples": 16, "batch_size": 4, "max_length": MAX_LENGTH, "sequential": True,
            "reduce_non_diagonal_ratio": 1.0}


@pytest.fixture(scope="module")
def llama64(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("pp-llama")
    return [build_llama(root / f"llama-{i}", seed=190 + i, dtype=torch.float64) for i in range(2)]


def hybrid(merged: Path, candidate: Path, prefixes: tuple[str, ...]) -> torch.nn.Module:
    """The merged model with the candidate's tensors under `prefixes` (its block l, or its tail)."""
    config = transformers.AutoConfig.from_pretrained(merged)
    model = getattr(transformers, config.architectures[0]).from_pretrained(merged, dtype="auto").eval()
    own = load_dir(candidate)
    state = model.state_dict()
    state.update({k: v for k, v in own.items() if k.startswith(prefixes)})
    model.load_state_dict(state)
    return model


def least_squares(xs: list[torch.Tensor], targets: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """argmin_W Σ_i (w_i / n_i) ‖X_i W − T_i‖², by lstsq on rows scaled by sqrt(w_i / n_i)."""
    scales = [(w / x.shape[0]) ** 0.5 for x, w in zip(xs, weights)]
    a = torch.cat([s * x for s, x in zip(scales, xs)])
    b = torch.cat([s * t for s, t in zip(scales, targets)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def check_stage(out: Path, models: list[Path], examples: list[list[dict]], prefixes: tuple[str, ...],
                linears: list[str], weights: list[float]) -> None:
    merged = load_dir(out)
    xs = [module_inputs(hybrid(out, model, prefixes), linears, ex) for model, ex in zip(models, examples)]
    for module in linears:
        name = f"{module}.weight"
        own = [load_dir(m)[name].double() for m in models]
        x = [inputs[module] for inputs in xs]
        expected = least_squares(x, [xi @ w.T for xi, w in zip(x, own)], weights).T
        error = torch.linalg.norm(merged[name].double() - expected) / torch.linalg.norm(expected)
        assert error < 1e-9, f"{name}: relative error {float(error):.2e}"


def test_llama_every_block_and_the_head_fit_the_merged_prefix(tmp_path, llama64, text_data):
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama64, text_data)), settings=SETTINGS)
    out = tmp_path / "out"
    result = cli("regmean", "merge", recipe, "-o", out, "--set", "models.1.weight=3")
    assert result.exit_code == 0, result.output
    assert "15 RegMean++ (linear weights)" in result.stdout
    weights = [0.25, 0.75]
    examples = [text_inputs(m, first_examples(d, 16), max_length=MAX_LENGTH) for m, d in zip(llama64, text_data)]
    for block in range(2):
        linears = [f"model.layers.{block}.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                         "mlp.down_proj")]
        check_stage(out, llama64, examples, (f"model.layers.{block}.",), linears, weights)
    check_stage(out, llama64, examples, ("model.norm.", "lm_head."), ["lm_head"], weights)

    # the embeddings and norms are the weighted average; the card and the recipe say RegMean++
    merged, own = load_dir(out), [load_dir(m) for m in llama64]
    for name in ("model.embed_tokens.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight"):
        torch.testing.assert_close(merged[name], 0.25 * own[0][name] + 0.75 * own[1][name], rtol=1e-12, atol=1e-12)
    assert "A RegMean++ merge of 2 models" in (out / "README.md").read_text()
    assert "sequential = true" in (out / "mergecli.toml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.toml"]  # no scratch, no stats


def test_differs_from_regmean_and_needs_no_collect_stats(tmp_path, llama64, text_data):
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama64, text_data)), settings=SETTINGS)
    result = cli("regmean", "collect-stats", recipe)
    assert result.exit_code == 0, result.output
    assert "RegMean++" in result.stderr and "not needed" in result.stderr
    assert not (tmp_path / "stats").exists()
    assert cli("regmean", "merge", recipe, "-o", tmp_path / "pp").exit_code == 0
    plain = ["--set", "regmean.sequential=false"]
    assert cli("regmean", "collect-stats", recipe, *plain).exit_code == 0
    assert cli("regmean", "merge", recipe, "-o", tmp_path / "rm", *plain).exit_code == 0
    pp, rm = load_dir(tmp_path / "pp"), load_dir(tmp_path / "rm")
    name = "model.layers.1.mlp.down_proj.weight"  # block 1's inputs differ: block 0 is merged first
    assert torch.linalg.norm(pp[name] - rm[name]) > 1e-6 * torch.linalg.norm(rm[name])


def test_clip_vision_blocks_fit_the_merged_prefix(tmp_path, image_data):
    models = [build_clip_vision(tmp_path / f"clip-{i}", seed=194 + i, dtype=torch.float64) for i in range(2)]
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(models, image_data)),
                          settings={**SETTINGS, "num_examples": 7, "batch_size": 3})
    out = tmp_path / "out"
    assert cli("regmean", "merge", recipe, "-o", out).exit_code == 0
    examples = [image_inputs(m, d) for m, d in zip(models, image_data)]
    block = 1
    linears = [f"encoder.layers.{block}.{p}" for p in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")]
    check_stage(out, models, examples, (f"encoder.layers.{block}.",), linears, [0.5, 0.5])
