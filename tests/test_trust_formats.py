"""Checkpoints mergecli cannot read are refused in one line naming their format, before anything is
written: never an empty output, or stored codes and scales merged as if they were weights. (The quantized
formats it reads, with their config, are in test_quantized.py; without their config, they are refused.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantized
from builders import build_llama
from clirunner import cli


@pytest.fixture(scope="session")
def plain(models_dir) -> Path:
    return build_llama(models_dir / "plain-for-formats", seed=31)


@pytest.fixture(scope="session")
def formats(models_dir, plain) -> dict[str, Path]:
    """A tiny checkpoint of each format, in its real stored layout."""
    root = models_dir / "formats"
    root.mkdir()
    gpt_oss = quantized.build_gpt_oss(root / "gpt-oss-plain", seed=32)
    return {
        "compressed-tensors (pack-quantized)": quantized.compressed_tensors(root / "int4", plain),
        "GPTQ": quantized.gptq(root / "gptq", plain)[0],
        "AWQ": quantized.awq(root / "awq", plain)[0],
        "MXFP4": quantized.mxfp4_gpt_oss(root / "mxfp4", gpt_oss)[0],
        "bitsandbytes 4-bit": quantized.bnb_4bit(root / "bnb", plain),
        "fp8 block-scaled": quantized.fp8_block(root / "fp8", plain),
    }


def assert_refused(result, words: str, out: Path) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert len(lines) == 2 and lines[1].startswith("hint: "), result.stderr  # one line, and what to do
    assert "internal error" not in result.stderr and not out.exists()


def test_a_quantized_checkpoint_in_a_format_mergecli_does_not_read_is_refused_naming_it(formats, tmp_path):
    """bitsandbytes 4-bit used to merge with 91 tensors dropped (exit 0); the formats mergecli reads are
    tested in test_quantized.py."""
    model = formats["bitsandbytes 4-bit"]
    out = tmp_path / "out"
    result = cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", out)
    assert_refused(result, "its weights are stored quantized, as bitsandbytes 4-bit "
                           "(quantization_config.quant_method", out)


def without_config(model: Path, tmp_path: Path) -> Path:
    copy = Path(shutil.copytree(model, tmp_path / f"{model.name}-bare"))
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("name, words", [
    ("GPTQ", "as GPTQ or AWQ (tensor 'model.layers."),
    ("AWQ", "as GPTQ or AWQ (tensor 'model.layers."),
    ("fp8 block-scaled", "as fp8 block-scaled (tensor 'model.layers."),
    ("bitsandbytes 4-bit", "as bitsandbytes (tensor 'model.layers."),
    ("compressed-tensors (pack-quantized)", "as compressed-tensors pack-quantized (tensor 'model.layers."),
    ("MXFP4", "as MXFP4 (tensor 'model.layers."),
])
def test_the_tensors_show_the_format_where_the_config_does_not(formats, name, words, tmp_path):
    model = without_config(formats[name], tmp_path)
    out = tmp_path / "out"
    assert_refused(cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", out), words, out)


def test_fp8_values_without_any_scale_are_refused_by_their_dtype(plain, tmp_path):
    model = Path(shutil.copytree(plain, tmp_path / "fp8-bare"))
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = cli("average", "-m", model, "-m", plain, "-o", out)
    assert_refused(result, "as fp8 (tensor 'model.layers.1.mlp.up_proj.weight' is stored as float8_e4m3fn)", out)


def test_gguf_files_are_refused_by_name(plain, tmp_path):
    folder = tmp_path / "gguf"
    folder.mkdir()
    shutil.copyfile(plain / "config.json", folder / "config.json")
    (folder / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    out = tmp_path / "out"
    assert_refused(cli("average", "-m", folder, "-m", plain, "-o", out), "holds GGUF files (model-Q4_K_M.gguf)", out)
    assert_refused(cli("average", "-m", folder / "model-Q4_K_M.gguf", "-m", plain / "model.safetensors", "-o", out),
                   "a GGUF file, which mergecli does not read", out)


# ---------------------------------------------------------------------------------------------
# The guard behind the formats: whatever an input holds, the output keeps what transformers loads


def test_weights_stored_under_unknown_names_are_not_dropped_into_an_output_without_them(plain, tmp_path):
    """A format no one has named yet: integer codes where the weights should be. They used to be
    dropped as buffers transformers does not load, and the output lacked those weights."""
    model = Path(shutil.copytree(plain, tmp_path / "codes"))
    tensors = load_file(model / "model.safetensors")
    for name in [n for n in tensors if n.endswith("q_proj.weight")]:
        tensors[name.replace(".weight", ".codes")] = tensors.pop(name).to(torch.int8)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    result = cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", out)
    assert_refused(result, "the output would lack weights that transformers loads for LlamaForCausalLM "
                           "('model.layers.0.self_attn.q_proj.weight' and 1 more)", out)


def test_an_output_without_tensors_is_refused(plain, tmp_path):
    model = tmp_path / "buffers-only"
    model.mkdir()
    shutil.copyfile(plain / "config.json", model / "config.json")
    save_file({"model.rotary_emb.inv_freq_cache": torch.arange(4)}, model / "model.safetensors")
    out = tmp_path / "out"
    result = cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", out)
    assert_refused(result, "the merge would write an output without tensors", out)
