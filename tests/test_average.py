"""End-to-end weighted averaging on tiny real checkpoints, checked against float64 recomputation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clirunner import cli
from mergecli.methods import base


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (sharded or not), read with safetensors itself."""
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reference_average(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Independent float64 recomputation of Σ w_i θ_i with normalized weights."""
    total = sum(weights)
    models = [load_dir(p) for p in paths]
    return {name: sum(m[name].double() * (w / total) for m, w in zip(models, weights))
            for name in models[0]}


def assert_matches(output: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    merged = load_dir(output)
    assert set(merged) == set(expected)
    for name, tensor in merged.items():
        assert tensor.dtype == dtype, name
        want = expected[name].to(dtype)
        # float32 accumulation vs float64: equal up to one rounding step of the output dtype
        tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(tensor.double(), want.double(), rtol=tol, atol=tol * 1e-3, msg=name)


def test_three_fp32_models_weighted(llama_fp32, tmp_path):
    out = tmp_path / "out"
    result = cli("average", *sum((["-m", p] for p in llama_fp32), []), "-w", "0.2,0.3,0.5", "-o", out)
    assert result.exit_code == 0, result.output
    assert_matches(out, reference_average(llama_fp32, [0.2, 0.3, 0.5]), torch.float32)
    assert sorted(p.name for p in out.iterdir()) == sorted([
        ".mergecli-manifest.json", "README.md", "chat_template.jinja", "config.json", "generation_config.json",
        "mergecli.toml", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


def test_sharded_bf16_inputs(llama_bf16_sharded, tmp_path):
    out = tmp_path / "out"
    result = cli("average", "-m", llama_bf16_sharded[0], "-m", llama_bf16_sharded[1], "-o", out)
    assert result.exit_code == 0, result.output
    assert_matches(out, reference_average(llama_bf16_sharded, [1, 1]), torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_mixed_dtypes_and_output_dtype(llama_fp32, llama_bf16_sharded, tmp_path):
    """fp32 + bf16 inputs (different seeds, same shapes), written as float16."""
    out = tmp_path / "out"
    paths = [llama_fp32[0], llama_bf16_sharded[0]]
    result = cli("average", "-m", paths[0], "-m", paths[1], "-o", out, "--set", "dtype=float16")
    assert result.exit_code == 0, result.output
    assert_matches(out, reference_average(paths, [1, 1]), torch.float16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_small_shards_and_row_blocks(llama_fp32, tmp_path, monkeypatch):
    """Many output shards with an index, and every tensor split into row blocks of 100 elements."""
    monkeypatch.setattr(base, "BLOCK_ELEMENTS", 100)
    out = tmp_path / "out"
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out, "--set", "shard_size=30000")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and {s.name for s in shards} == set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_dir(out).values())
    assert all(s.stat().st_size <= 30000 + 4096 or len(load_file(s)) == 1 for s in shards)
    assert_matches(out, reference_average(llama_fp32[:2], [1, 1]), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.shape == (128, 32)


def test_merged_llama_logits_equal_in_memory_average(llama_fp32, tmp_path):
    out = tmp_path / "out"
    weights = [0.6, 0.4]
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-w", "0.6,0.4", "-o", out)
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(out)
    expected = AutoModelForCausalLM.from_pretrained(llama_fp32[0])
    states = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in llama_fp32[:2]]
    expected.load_state_dict({k: sum(s[k] * w for s, w in zip(states, weights)) for k in states[0]})
    tokens = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, expected(tokens).logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_stay_tied(llama_tied, tmp_path):
    out = tmp_path / "out"
    result = cli("average", "-m", llama_tied[0], "-m", llama_tied[1], "-o", out,
                 "--set", "backbone_only=true")
    assert result.exit_code == 0, result.output
    merged = load_dir(out)
    assert "lm_head.weight" not in merged
    assert "no tensor matches the head patterns" in result.stderr
    assert_matches(out, reference_average(llama_tied, [1, 1]), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_backbone_only_head_from_base(llama_fp32, tmp_path):
    base, a, b = llama_fp32
    recipe = write_recipe(tmp_path, f'output = "out"\nbackbone_only = true\n[base]\npath = "{base}"\n'
                                    f'[[models]]\npath = "{a}"\n[[models]]\npath = "{b}"\n')
    result = cli("average", recipe)
    assert result.exit_code == 0, result.output
    merged, base_tensors = load_dir(tmp_path / "out"), load_dir(base)
    expected = reference_average([a, b], [1, 1])
    assert torch.equal(merged["lm_head.weight"], base_tensors["lm_head.weight"])
    expected.pop("lm_head.weight")
    for name, tensor in expected.items():  # the base is never averaged in
        torch.testing.assert_close(merged[name].double(), tensor, rtol=1e-6, atol=1e-9)


def test_backbone_only_head_from_first_model_and_exclude(llama_fp32, tmp_path):
    a, b = llama_fp32[1], llama_fp32[2]
    result = cli("average", "-m", a, "-m", b, "-o", tmp_path / "out", "--set", "backbone_only=true",
                 "--set", "exclude=['model\\.norm\\.weight']")
    assert result.exit_code == 0, result.output
    merged, first = load_dir(tmp_path / "out"), load_dir(a)
    assert torch.equal(merged["lm_head.weight"], first["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], first["model.norm.weight"])
    expected = reference_average([a, b], [1, 1])
    torch.testing.assert_close(merged["model.embed_tokens.weight"].double(),
                               expected["model.embed_tokens.weight"], rtol=1e-6, atol=1e-9)


def test_custom_head_patterns(llama_fp32, tmp_path):
    a, b = llama_fp32[:2]
    result = cli("average", "-m", a, "-m", b, "-o", tmp_path / "out", "--set", "backbone_only=true",
                 "--set", "head=['model\\.embed_tokens\\..*']")
    assert result.exit_code == 0, result.output
    merged, first = load_dir(tmp_path / "out"), load_dir(a)
    assert torch.equal(merged["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert not torch.equal(merged["lm_head.weight"], first["lm_head.weight"])


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_plain_state_dicts_with_integer_buffers(tmp_path, suffix):
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        net = TinyNet()
        net.encoder[1].num_batches_tracked.fill_(10 + seed)  # an integer buffer that differs
        paths.append(tmp_path / f"net{seed}{suffix}")
        torch.save(net.state_dict(), paths[-1])
    out = tmp_path / "out"
    result = cli("average", "-m", paths[0], "-m", paths[1], "-w", "1,3", "-o", out)
    assert result.exit_code == 0, result.output
    merged = load_file(out / "model.safetensors")
    states = [torch.load(p, weights_only=True) for p in paths]
    for name, tensor in merged.items():
        if name.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.int64 and tensor.item() == 10  # from the first model
        else:
            want = states[0][name].double() * 0.25 + states[1][name].double() * 0.75
            torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-9)
    assert "num_batches_tracked: integer tensor differs" in result.stderr
    assert not (out / "config.json").exists()


def test_resolved_recipe_reproduces_bit_for_bit(llama_fp32, tmp_path):
    out = tmp_path / "out"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-w", "0.3,0.7", "-o", out,
               "--set", "dtype=bfloat16").exit_code == 0
    again = tmp_path / "again"
    result = cli("average", out / "mergecli.toml", "-o", again)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- merge\n- mergecli" in card and "library_name: transformers" in card
    assert "pipeline_tag: text-generation" in card and "0.3" in card


def test_force_replaces_output(llama_fp32, tmp_path):
    out = tmp_path / "out"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[2], "-o", out).exit_code == 0
    before = load_file(out / "model.safetensors")
    result = cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out, "--force")
    assert result.exit_code == 0, result.output
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_dry_run_and_validate_write_nothing(llama_fp32, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f'output = "out"\n[[models]]\npath = "{llama_fp32[0]}"\n'
                                    f'[[models]]\npath = "{llama_fp32[1]}"\n')
    for args in (["average", recipe, "--dry-run"], ["validate", recipe]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert "21 tensors averaged" in result.stdout and "peak memory" in result.stdout
        assert "read" in result.stdout and "write" in result.stdout
        assert not out.exists()


def test_library_api(llama_fp32, tmp_path):
    """The same merge through the public Python API: plan (nothing read), then run."""
    import mergecli

    recipe_path = write_recipe(tmp_path, f'output = "api-out"\n[[models]]\npath = "{llama_fp32[0]}"\n'
                                         f'[[models]]\npath = "{llama_fp32[1]}"\nweight = 3\n')
    plan = mergecli.plan_merge(mergecli.load_recipe(recipe_path))
    assert not (tmp_path / "api-out").exists() and plan.counts() == {"average": 21}
    report = mergecli.run_merge(plan)
    assert report.output == tmp_path / "api-out" and report.tensors == 21
    assert_matches(report.output, reference_average(llama_fp32[:2], [1, 3]), torch.float32)
