"""mergekit's config forms give mergekit's result: each config below runs in mergekit 0.1.5 and in
`mergecli merge config.yml`, on the same tiny LLaMAs (4 layers, float32), and every tensor agrees, bit
for bit where the arithmetic is the same, else within float32 rounding (mergecli takes angles and sums
in float64 where mergekit rounds to float32 between steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_vocabulary import fine_tune
from transformers import AutoTokenizer

from builders import build_llama, llama_config, word_tokenizer
from clirunner import cli
from peers import assert_close, run_mergekit, tensors

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def build_deep_llama(path: Path, *, seed: int, layers: int = 4) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config(layers=layers)).save_pretrained(path)
    word_tokenizer(128).save_pretrained(path)
    return path


def fine_tuned(base: Path, path: Path, seed: int) -> Path:
    """The base's weights moved a little (a fine-tune), its support files as they are."""
    path.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weights = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in load_file(
        base / "model.safetensors").items()}
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    for file in base.iterdir():
        if file.suffix != ".safetensors":
            (path / file.name).write_bytes(file.read_bytes())
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    base = build_deep_llama(root / "base", seed=0)
    return {"base": base, "a": fine_tuned(base, root / "a", 1), "b": fine_tuned(base, root / "b", 2),
            "other": build_deep_llama(root / "other", seed=3)}


def both(tmp_path: Path, text: str, *, script: str = "mergekit-yaml") -> tuple[dict, dict, Path]:
    """(mergecli's tensors, mergekit's, mergecli's output) of one config."""
    config = tmp_path / "config.yml"
    config.write_text(text)
    run_mergekit(config, tmp_path / "theirs", script=script)
    result = cli("merge", config, "-o", tmp_path / "ours")
    assert result.exit_code == 0, result.output
    return tensors(tmp_path / "ours"), tensors(tmp_path / "theirs"), tmp_path / "ours"


def test_a_gradient_is_evaluated_as_mergekit_evaluates_it_outside_the_layers_too(family, tmp_path):
    ours, theirs, _ = both(tmp_path, f"""
merge_method: slerp
base_model: {family['a']}
models: [{{model: {family['a']}}}, {{model: {family['b']}}}]
parameters:
  t: [0, 0.5, 0.3, 0.7, 1]
dtype: float32
""")
    assert_close(ours, theirs)
    a, b = load_file(family["a"] / "model.safetensors"), load_file(family["b"] / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):  # outside the layers: t = 0
        assert torch.equal(ours[name], a[name]), name
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"])  # t = 1


def test_filters_give_their_values_to_their_tensors(family, tmp_path):
    ours, theirs, _ = both(tmp_path, f"""
merge_method: slerp
base_model: {family['a']}
models: [{{model: {family['a']}}}, {{model: {family['b']}}}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""")
    assert_close(ours, theirs)


def test_per_model_gradients_of_weight_and_density(family, tmp_path):
    for method, extra in (("task_arithmetic", "lambda: 0.8"), ("ties", "normalize: true")):
        folder = tmp_path / method
        folder.mkdir()
        ours, theirs, _ = both(folder, f"""
merge_method: {method}
base_model: {family['base']}
parameters: {{{extra}}}
models:
  - model: {family['a']}
    parameters: {{weight: [0.2, 1.0], density: [0.3, 0.9]}}
  - model: {family['b']}
    parameters:
      weight: 0.6
      density: [{{filter: mlp, value: 0.4}}, {{value: 0.8}}]
dtype: float32
""")
        assert_close(ours, theirs, ulps=4)


def test_slices_of_one_source_are_layers_taken_as_they_are(family, tmp_path):
    ours, theirs, out = both(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {family['a']}, layer_range: [0, 3]}}]
  - sources: [{{model: {family['other']}, layer_range: [1, 4]}}]
dtype: float32
""")
    assert_close(ours, theirs, exact=True)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6


def test_slices_of_several_sources_are_merged_with_the_method(family, tmp_path):
    text = f"""
merge_method: slerp
base_model: {family['a']}
slices:
  - sources:
      - {{model: {family['a']}, layer_range: [0, 2]}}
      - {{model: {family['b']}, layer_range: [2, 4]}}
  - sources:
      - {{model: {family['a']}, layer_range: [2, 4]}}
      - {{model: {family['b']}, layer_range: [0, 2]}}
parameters:
  t: [0.1, 0.9]
dtype: float32
"""
    ours, theirs, _ = both(tmp_path, text)
    assert_close(ours, theirs)
    modules = tmp_path / "modules"
    modules.mkdir()
    nested = text.replace("slices:", "modules:\n  default:\n    slices:").replace("\n  - sources", "\n      - sources")
    nested = nested.replace("\n      - {", "\n          - {")
    again, _, _ = both(modules, nested)
    assert_close(again, ours, exact=True)  # mergekit's newer `modules` form, read the same


def test_a_passthrough_source_scale(family, tmp_path):
    ours, theirs, _ = both(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {family['a']}, layer_range: [0, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}},
               {{value: 1.0}}]}}}}]
dtype: float32
""")
    assert_close(ours, theirs, exact=True)


def test_stages_of_a_multi_document_config(family, tmp_path):
    text = f"""
name: blend
merge_method: slerp
base_model: {family['a']}
models: [{{model: {family['a']}}}, {{model: {family['b']}}}]
parameters: {{t: 0.3}}
dtype: float32
---
merge_method: task_arithmetic
base_model: {family['base']}
models:
  - model: blend
    parameters: {{weight: 0.7}}
  - model: {family['b']}
    parameters: {{weight: 0.4}}
dtype: float32
"""
    ours, theirs, out = both(tmp_path, text, script="mergekit-multi")
    assert_close(ours, theirs, ulps=4)
    recipe = (out / "mergecli.toml").read_text()
    assert '[[stages]]\nmethod = "slerp"' in recipe and 'path = "stage:blend"' in recipe
    assert not list(out.glob(".stages*")) and not list(tmp_path.glob(".ours*"))  # the intermediate is gone
    again = cli("merge", out / "mergecli.toml", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity-chat")
    base = build_llama(root / "base", seed=0, vocab_size=62)
    return {"base": base, "chat": fine_tune(base, root / "chat", ["<|im_start|>", "<|im_end|>"], 1),
            "tool": fine_tune(base, root / "tool", ["<|im_start|>", "<tool>"], 2)}


def rows(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """tensor → token → its row, by the output's own tokenizer."""
    weights = tensors(path)
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    return {name: {token: weights[name][i] for token, i in vocab.items()}
            for name in ("model.embed_tokens.weight", "lm_head.weight")}


def test_the_tokenizer_table_and_padding(chats, tmp_path):
    ours, theirs, out = both(tmp_path, f"""
merge_method: task_arithmetic
base_model: {chats['base']}
models:
  - model: {chats['chat']}
    parameters: {{weight: 1.0}}
  - model: {chats['tool']}
    parameters: {{weight: 1.0}}
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    <|im_end|>:
      source: {chats['chat']}
      force: true
    <tool>:
      source: {{kind: model_token, model: {chats['tool']}, token: the}}
    <pad>:
      source: {{kind: zero}}
      force: true
dtype: float32
""")
    mine, peer = rows(out), rows(tmp_path / "theirs")
    for name in mine:
        assert set(mine[name]) == set(peer[name])  # the same tokens, whatever order each numbers them in
        for token, row in mine[name].items():
            assert torch.allclose(row, peer[name][token], rtol=0, atol=1e-6), (name, token)
        weights, theirs_weights = ours[name], theirs[name]
        assert weights.shape == theirs_weights.shape == (80, 32)  # 62 + 3 tokens, padded to a multiple of 16
        assert torch.allclose(weights[-1], theirs_weights[-1], atol=1e-6)  # padding: the mean row, as mergekit's


@pytest.mark.parametrize("template", ["chatml", "mistral", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                      "{% endfor %}"], ids=["chatml", "mistral", "jinja"])
def test_the_chat_template_renders_as_mergekits(family, tmp_path, template):
    ours, theirs, out = both(tmp_path, f"""
merge_method: linear
models: [{{model: {family['a']}, parameters: {{weight: 1}}}}, {{model: {family['b']}, parameters: {{weight: 1}}}}]
chat_template: {json.dumps(template)}
dtype: float32
""")
    assert_close(ours, theirs)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"}]
    rendered = [AutoTokenizer.from_pretrained(path).apply_chat_template(conversation, tokenize=False,
                                                                       add_generation_prompt=True)
                for path in (out, tmp_path / "theirs")]
    assert rendered[0] == rendered[1]
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_per_layer_config_lists_follow_the_slices(tmp_path):
    """Gemma 2's `layer_types` alternates sliding and full attention: an output of slices keeps each layer's
    own type, in a list of the output's depth, and loads."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=128)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "passthrough"\noutput = "out"\n[[models]]\npath = "{tmp_path / "gemma"}"\n'
                      f'name = "g"\n[[slices]]\nsources = [{{ model = "g", layers = [0, 3] }}]\n'
                      f'[[slices]]\nsources = [{{ model = "g", layers = [2, 4] }}]\n')
    result = cli("merge", recipe)
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    source = config.layer_types
    assert written["num_hidden_layers"] == 5
    assert written["layer_types"] == [source[0], source[1], source[2], source[2], source[3]]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == written["layer_types"] and len(model.model.layers) == 5
