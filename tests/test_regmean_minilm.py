"""RegMean end to end on the real all-MiniLM-L6-v2 checkpoint: two perturbed copies, collect-stats
and merge through the CLI, the merged model loaded with transformers and run."""

from __future__ import annotations

import json

import torch
import transformers

from clirunner import cli
from references import load_dir, minilm_dir, perturbed_copy, random_texts, write_recipe, write_txt


def embed(model: transformers.PreTrainedModel, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_collect_and_merge(tmp_path):
    models = [perturbed_copy(minilm_dir(), tmp_path / f"minilm-{i}", seed=i, scale=0.05) for i in range(2)]
    data = [write_txt(tmp_path / f"data-{i}.txt", random_texts(10 + i, 24, shortest=4, longest=40)) for i in range(2)]
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(models, data)),
                          settings={"num_examples": 24, "batch_size": 8, "max_length": 32})
    result = cli("regmean", "collect-stats", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    result = cli("regmean", "merge", recipe, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["regmean"] == 37  # 6 layers × 6 linear weights + the pooler
    out = tmp_path / "out"

    merged, inputs, original = load_dir(out), [load_dir(m) for m in models], load_dir(minilm_dir())
    assert "embeddings.position_ids" in original and "embeddings.position_ids" not in merged  # a buffer: dropped
    norm = "encoder.layer.3.output.LayerNorm.weight"
    torch.testing.assert_close(merged[norm], (inputs[0][norm] + inputs[1][norm]) / 2)
    name = "encoder.layer.2.intermediate.dense.weight"
    average = (inputs[0][name] + inputs[1][name]) / 2
    assert not torch.allclose(merged[name], average, rtol=0, atol=1e-4)  # RegMean, not the average

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModel.from_pretrained(out).eval()
    reference = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    sentences = ["the model merges weights", "a layer of data", "math and code"]
    similarity = (embed(model, tokenizer, sentences) * embed(reference, tokenizer, sentences)).sum(-1)
    assert torch.isfinite(similarity).all() and (similarity > 0.9).all(), similarity
