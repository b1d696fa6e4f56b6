"""Tiny real checkpoints for tests and the demo: transformers configs with random weights, saved
with `save_pretrained`, and word-level tokenizers built with `tokenizers`."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("the a of to and in is it that for on with as was at by be this from or an are which one all "
         "model merge weight layer token data math code text image train test loss mean sum").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
)


def word_tokenizer(vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with `vocab_size` entries (specials, words, fillers)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(WORDS))}
    while len(vocab) < vocab_size:
        vocab[f"w{len(vocab)}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def llama_config(*, vocab_size: int = 128, tie: bool = False, hidden: int = 32, layers: int = 2,
                 intermediate: int = 64) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )


def build_llama(path: Path, *, seed: int, dtype: torch.dtype = torch.float32, tie: bool = False,
                max_shard_size: str | None = None, vocab_size: int = 128) -> Path:
    """Save a random tiny LLaMA (with tokenizer and generation config) to `path`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(vocab_size=vocab_size, tie=tie)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    word_tokenizer(vocab_size).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# More families, for RegMean: GPT-2 (HF Conv1D), BERT with a classification head, CLIP vision.


def _save_trained(model_class, config, path: Path, *, seed: int, dtype: torch.dtype) -> None:
    """Save a random model whose LayerNorms look trained (not the identity of a fresh init): a zero
    bias would make every normalized input orthogonal to the all-ones vector, and every Gram singular."""
    torch.manual_seed(seed)
    model = model_class(config)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    model.to(dtype).save_pretrained(path)


def build_gpt2(path: Path, *, seed: int, vocab_size: int = 128, positions: int = 64,
               dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny GPT-2 LM (Conv1D layers, tied head) with a word-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=positions,
                        bos_token_id=2, eos_token_id=3, pad_token_id=0)
    _save_trained(GPT2LMHeadModel, config, path, seed=seed, dtype=dtype)
    word_tokenizer(vocab_size).save_pretrained(path)
    return path


def build_bert(path: Path, *, seed: int, vocab_size: int = 128, labels: int = 3,
               dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny BERT sequence classifier (checkpoint names start with `bert.`)."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=labels, pad_token_id=0)
    _save_trained(BertForSequenceClassification, config, path, seed=seed, dtype=dtype)
    word_tokenizer(vocab_size).save_pretrained(path)
    return path


def build_clip_vision(path: Path, *, seed: int, image_size: int = 32, patch_size: int = 8,
                      dtype: torch.dtype = torch.float32) -> Path:
    """Save a random tiny `CLIPVisionModel` with its image processor (`preprocessor_config.json`)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=16)
    _save_trained(CLIPVisionModel, config, path, seed=seed, dtype=dtype)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path
