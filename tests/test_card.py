"""The model card: front matter the hub accepts, and a page that says what the merge is."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from clirunner import cli
from fakehub import FakeHub
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)
from mergecli.merge.card import render_card
from mergecli.methods.registry import method_of
from mergecli.recipe import dump_recipe, recipe_from_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHA = "0123456789abcdef0123456789abcdef01234567"
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16"}


def recipe(data: dict, tmp_path: Path):
    return recipe_from_data(data, source="test", base_dir=tmp_path)


def card_of(spec, *, config: dict | None, title: str = "merged-model") -> str:
    return render_card(spec, method_of(spec), config=config, title=title)


def split(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    _, meta, body = card.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_hub_merge_front_matter_and_page(tmp_path, fake_hub: FakeHub):
    spec = recipe({
        "output": "merged/llama-math-code", "backbone_only": True,
        "base": {"path": "meta-llama/Llama-2-7b-hf", "revision": SHA},
        "models": [{"path": "org/llama-math", "revision": SHA, "weight": 1, "name": "math"},
                   {"path": "org/llama-code", "weight": 3, "name": "code"},
                   {"path": str(tmp_path / "local-ft"), "weight": 4}],
        "push": {"repo_id": "me/llama-math-code"},
    }, tmp_path)

    card = card_of(spec, config=LLAMA_CONFIG, title="llama-math-code")
    meta, body = split(card)

    assert meta == {
        "base_model": ["meta-llama/Llama-2-7b-hf", "org/llama-math", "org/llama-code"],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["merge", "mergecli"],
    }
    ModelCard(card).validate()  # the hub's YAML check (the fake's /api/validate-yaml)
    assert fake_hub.requests_matching("POST", "/api/validate-yaml")[-1].status == 200
    parsed = ModelCard(card).data  # and huggingface_hub's own reading of it
    assert parsed.base_model == meta["base_model"] and parsed.tags == ["merge", "mergecli"]

    assert body.startswith("\n# llama-math-code\n\nA weighted average of 3 models")
    assert "| math | 0.125 | [org/llama-math](https://huggingface.co/org/llama-math) @ [`0123456789ab`]" in body
    assert "| code | 0.375 | [org/llama-code](https://huggingface.co/org/llama-code) |" in body
    assert "| local-ft | 0.5 | `local-ft` (local) |" in body
    assert "Base model: [meta-llama/Llama-2-7b-hf]" in body
    assert "written as bfloat16" in body
    assert "head tensors (`lm_head\\..*`, `score\\..*`, `classifier\\..*`) copied from the base model" in body
    assert 'AutoModelForCausalLM.from_pretrained("me/llama-math-code")' in body
    toml_block = body.split("```toml\n", 1)[1].split("```", 1)[0]
    assert toml_block == dump_recipe(spec)
    assert tomllib.loads(toml_block)["models"][0]["revision"] == SHA


def test_local_merge_without_config_has_minimal_front_matter(tmp_path):
    spec = recipe({"models": [{"path": str(tmp_path / "a.safetensors")}, {"path": str(tmp_path / "b")}]}, tmp_path)
    card = card_of(spec, config=None)
    meta, body = split(card)
    assert meta == {"tags": ["merge", "mergecli"]}
    assert "## Use" not in body and "# merged-model" in body


def test_regmean_card(tmp_path):
    spec = recipe({"method": "regmean", "output": "out", "exclude": ["classifier\\..*"],
                   "regmean": {"reduce_non_diagonal_ratio": 0.9, "num_examples": 64},
                   "models": [{"path": "org/bert-a", "data": "a.jsonl"}, {"path": "org/bert-b", "data": "b.jsonl"}]},
                  tmp_path)
    meta, body = split(card_of(spec, config={"architectures": ["BertForSequenceClassification"]}))
    assert meta["pipeline_tag"] == "text-classification"
    assert "**RegMean** ([Jin et al., ICLR 2023](https://arxiv.org/abs/2212.09849)" in body
    assert "α (`reduce_non_diagonal_ratio`): 0.9" in body and "up to 64 examples per model" in body
    assert "tensors matching `classifier\\..*` copied from the first model (`bert-a`), not merged" in body
    assert "`mergecli regmean merge mergecli.toml -o again/`" in body
    assert "AutoModelForSequenceClassification" in body


def test_broken_front_matter_is_refused_by_the_validator(fake_hub: FakeHub):
    """The check above can fail: the same validator rejects front matter that does not parse."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    def validate(text: str) -> int:
        response = get_session().post(f"{constants.ENDPOINT}/api/validate-yaml",
                                      json={"repoType": "model", "content": text})
        return response.status_code

    assert validate("---\nbase_model: [org/a\ntags: merge\n---\n# x\n") == 400
    assert validate("---\n- merge\n---\n# x\n") == 400
    assert validate(card_of(recipe({"models": [{"path": "org/a"}]}, Path.cwd()), config=None)) == 200


def test_card_of_a_real_merge_passes_validation(llama_fp32, tmp_path, fake_hub: FakeHub):
    out = tmp_path / "out"
    assert cli("average", "-m", llama_fp32[0], "-m", llama_fp32[1], "-o", out).exit_code == 0
    card = (out / "README.md").read_text()
    ModelCard(card).validate()
    meta, body = split(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # local inputs have no hub id
    assert "written as float32" in body
    size = sum(t.nbytes for t in load_file(llama_fp32[0] / "model.safetensors").values())
    assert re.search(rf"\| llama32-0 \| 0.5 \| `llama32-0` \(local, `sha256:[0-9a-f]{{12}}…`, "
                     rf"{size / 1e3:.1f} KB\) \|", body), body
    assert str(tmp_path) not in card and str(llama_fp32[0]) not in card
