"""Vocabularies united by token string: a base with 62 tokens, a chat fine-tune that added 2 and a tool
fine-tune that added 3 others (real tokenizers, real transformers LLaMAs). Each output row is checked
against the rule, recomputed here in float64 from the inputs' own rows found by token string."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from builders import build_llama
from clirunner import cli

CHAT = ["<|im_start|>", "<|im_end|>"]
TOOL = ["<tool>", "<think>", "</think>"]
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def fine_tune(base: Path, path: Path, added: list[str], seed: int, *, tie: bool = False) -> Path:
    """The base's weights moved a little, its tokenizer with `added` special tokens, and new random rows."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    tokenizer.add_tokens(added, special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-len(added):] = torch.randn(len(added), model.config.hidden_size)
        if not tie:
            model.get_output_embeddings().weight[-len(added):] = torch.randn(len(added), model.config.hidden_size)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def family(request, tmp_path_factory) -> dict:
    tie = request.param
    root = tmp_path_factory.mktemp("vocab")
    base = build_llama(root / "base", seed=0, vocab_size=62, tie=tie)
    return {"base": base, "tie": tie, "chat": fine_tune(base, root / "chat", CHAT, 1, tie=tie),
            "tool": fine_tune(base, root / "tool", TOOL, 2, tie=tie)}


def rows_by_token(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """tensor → token → its row (float64), by the model's own tokenizer."""
    tensors = load_file(path / "model.safetensors")
    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    return {name: {token: tensors[name][i].double() for token, i in vocab.items()} for name in VOCAB
            if name in tensors}


def recipe(tmp_path: Path, family: dict, method: str, extra: str = "", weights=(0.25, 0.75), **top) -> Path:
    lines = [f'method = "{method}"', 'output = "out"', *(f"{k} = {v!r}".replace("'", '"') for k, v in top.items())]
    if method != "average" or top.get("with_base", True):
        lines += ["[base]", f'path = "{family["base"]}"']
    lines = [line for line in lines if not line.startswith("with_base")]
    if extra:
        lines.append(extra)
    for name, weight in zip(("chat", "tool"), weights):
        lines += ["[[models]]", f'path = "{family[name]}"', f'name = "{name}"', f"weight = {weight}"]
    path = tmp_path / f"{method}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def merged(tmp_path: Path, recipe_path: Path, output: str = "out") -> Path:
    result = cli("merge", recipe_path, "--force", "-o", tmp_path / output)
    assert result.exit_code == 0, result.output
    return tmp_path / output


def expected_union(family: dict, combine) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The union's tokens in order, and each vocabulary tensor's rows by the rule: `combine(base_row,
    rows)` for a token every model has (rows: chat's, tool's); a token only one model has keeps its row."""
    base, chat, tool = (rows_by_token(family[k]) for k in ("base", "chat", "tool"))
    vocab = AutoTokenizer.from_pretrained(family["base"]).get_vocab()
    tokens = sorted(vocab, key=vocab.get) + CHAT + TOOL
    want = {}
    for name in base:
        rows = []
        for token in tokens:
            if token in CHAT:
                rows.append(chat[name][token])
            elif token in TOOL:
                rows.append(tool[name][token])
            else:
                rows.append(combine(base[name][token], [chat[name][token], tool[name][token]]))
        want[name] = torch.stack(rows)
    return tokens, want


def test_union_average_rows_tokenizer_and_config(family, tmp_path):
    out = merged(tmp_path, recipe(tmp_path, family, "average", tokenizer="union"))
    tokens, want = expected_union(family, lambda base, rows: 0.25 * rows[0] + 0.75 * rows[1])
    got = load_file(out / "model.safetensors")
    for name, rows in want.items():
        assert got[name].shape[0] == 67 and torch.allclose(got[name].double(), rows, atol=1e-6), name
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 67
    for row, token in enumerate(tokens[62:], start=62):  # each added token encodes to the row holding it
        assert tokenizer.convert_tokens_to_ids(token) == row
        assert tokenizer.encode(f"the {token} model", add_special_tokens=False)[1] == row
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 67 and model.get_input_embeddings().weight.shape[0] == 67
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) \
        == family["tie"]


def test_union_task_arithmetic_gives_a_token_the_base_lacks_to_the_models_that_have_it(family, tmp_path):
    out = merged(tmp_path, recipe(tmp_path, family, "task_arithmetic", "[task_arithmetic]\nlambda = 0.8",
                                  tokenizer="union"))
    _, want = expected_union(family, lambda base, rows: base + 0.8 * (0.25 * (rows[0] - base)
                                                                      + 0.75 * (rows[1] - base)))
    got = load_file(out / "model.safetensors")
    for name, rows in want.items():
        assert torch.allclose(got[name].double(), rows, atol=1e-6), name


def test_shared_tokens_give_the_logits_of_the_base_vocabulary_merge(family, tmp_path):
    union = merged(tmp_path, recipe(tmp_path, family, "average", tokenizer="union"), "union")
    result = cli("merge", recipe(tmp_path, family, "average", tokenizer="base"), "-o", tmp_path / "base-vocab")
    assert result.exit_code == 0, result.output
    assert "models.0 (chat): 2 tokens not in the output's vocabulary" in result.stderr
    ids = torch.tensor([[2, 5, 9, 17, 33, 61]])
    with torch.no_grad():
        wide = LlamaForCausalLM.from_pretrained(union)(ids).logits
        narrow = LlamaForCausalLM.from_pretrained(tmp_path / "base-vocab")(ids).logits
    assert narrow.shape[-1] == 62 and wide.shape[-1] == 67
    assert torch.allclose(wide[..., :62], narrow, atol=1e-6)


def test_a_model_named_gives_its_vocabulary_and_without_a_base_the_holders_share(family, tmp_path):
    path = recipe(tmp_path, family, "average", tokenizer="chat", with_base=False)
    out = merged(tmp_path, path)
    chat, tool = rows_by_token(family["chat"]), rows_by_token(family["tool"])
    got = load_file(out / "model.safetensors")
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 64 and all(vocab[t] >= 62 for t in CHAT)
    for name in chat:
        for token, row in vocab.items():
            want = chat[name][token] if token in CHAT else 0.25 * chat[name][token] + 0.75 * tool[name][token]
            assert torch.allclose(got[name][row].double(), want, atol=1e-6), (name, token)


def test_padding_rounds_the_rows_up_everywhere(family, tmp_path):
    out = merged(tmp_path, recipe(tmp_path, family, "average", tokenizer="union", pad_to_multiple_of=16))
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 80 and model.get_input_embeddings().weight.shape[0] == 80
    rows = model.get_input_embeddings().weight.detach().double()
    # padding no input has: the mean of the token rows, as mergekit fills it (for an average, the mean of
    # the merged rows is the merge of each input's mean)
    assert torch.allclose(rows[67:], rows[:67].mean(dim=0).expand(13, -1), atol=1e-6), (rows[67:] - rows[:67].mean(0))
    assert len(AutoTokenizer.from_pretrained(out)) == 67


def test_vocabularies_that_cannot_be_united_are_refused_before_reading(family, tmp_path):
    other = build_llama(tmp_path / "other", seed=5, vocab_size=70)  # another base vocabulary
    text = recipe(tmp_path, family, "average", tokenizer="union").read_text().replace(str(family["tool"]), str(other))
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = cli("merge", path, "--dry-run")
    assert result.exit_code == 1, result.output
    assert "(tool): its tokenizer's vocabulary differs from base's beyond added tokens" in result.stderr
    assert "Traceback" not in result.output

    (tmp_path / "bare").mkdir()
    for file in family["tool"].iterdir():
        if "token" not in file.name:
            (tmp_path / "bare" / file.name).write_bytes(file.read_bytes())
    path.write_text(recipe(tmp_path, family, "average", tokenizer="union").read_text().replace(
        str(family["tool"]), str(tmp_path / "bare")))
    result = cli("merge", path, "--dry-run")
    assert result.exit_code == 1 and "(tool) has no tokenizer.json" in result.stderr, result.output

    result = cli("merge", recipe(tmp_path, family, "average", tokenizer="nobody"), "--dry-run")
    assert result.exit_code == 2 and "tokenizer: 'nobody' is not" in result.stderr, result.output


def test_union_regmean_averages_the_embeddings_by_the_rule(family, tmp_path):
    text = "the model merge weight layer token data math code text\nthe a of to and in is it that\n" * 8
    for name in ("chat", "tool"):
        (tmp_path / f"{name}.txt").write_text(text)
    lines = ['method = "regmean"', 'output = "out"', 'tokenizer = "union"', "[base]", f'path = "{family["base"]}"']
    for name, weight in (("chat", 0.25), ("tool", 0.75)):
        lines += ["[[models]]", f'path = "{family[name]}"', f'name = "{name}"', f"weight = {weight}",
                  f'data = "{name}.txt"']
    lines += ["[regmean]", 'stats_dir = "stats"', "num_examples = 8", "batch_size = 4", "max_length = 16"]
    path = tmp_path / "regmean.toml"
    path.write_text("\n".join(lines) + "\n")
    assert cli("regmean", "collect-stats", path).exit_code == 0
    result = cli("regmean", "merge", path)
    assert result.exit_code == 0, result.output
    _, want = expected_union(family, lambda base, rows: 0.25 * rows[0] + 0.75 * rows[1])
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.allclose(got["model.embed_tokens.weight"].double(), want["model.embed_tokens.weight"], atol=1e-6)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 67 and len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 67
