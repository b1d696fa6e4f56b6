"""Quantized checkpoints read, dequantized a block of rows at a time, and fp8 block-scaled written.

Each format's tiny checkpoint is built by its own reference code where it runs here (compressed-tensors'
compressors, transformers' Fp8Quantize) and otherwise by the published formula (tests/quantized.py names
its source). Every merge of quantized inputs is checked against the same formula computed here in float64
over the dequantized weights (the builders' own float64 decoding, or compressed-tensors' decompression
through transformers), within the output's rounding; an fp8 output against a float64 requantization of the
float32 merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_method_formulas import CASES, units_off

import quantized
from builders import build_llama, llama_config, word_tokenizer
from clirunner import cli
from clirunner import merge_recipe as merged
from fakehub import fake_hub as fake_hub  # noqa: F401  (the fixture)

TILE = 16  # the tiny models' fp8 block


@pytest.fixture(scope="session")
def plains(models_dir) -> list[Path]:
    return [build_llama(models_dir / f"q-plain-{seed}", seed=seed) for seed in (41, 42, 43)]


def fp8_reference(path: Path) -> dict[str, torch.Tensor]:
    """An fp8 block-scaled checkpoint's weights in float64: fp8 value × its tile's weight_scale_inv."""
    stored = load_file(path / "model.safetensors")
    out = {}
    for name, value in stored.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = stored.get(name.removesuffix(".weight") + ".weight_scale_inv")
        if scale is None:
            out[name] = value.double()
            continue
        rows, cols = value.shape
        tiles = value.double().reshape(rows // TILE, TILE, cols // TILE, TILE) * scale.double()[:, None, :, None]
        out[name] = tiles.reshape(rows, cols)
    return out


def decompressed(path: Path) -> dict[str, torch.Tensor]:
    """A compressed-tensors checkpoint's weights in float64: its codes unpacked by compressed-tensors'
    own `unpack_from_int32`, then (q − zero) × scale, each scale spread over its group, channel or tensor."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    stored = load_file(path / "model.safetensors")
    args = next(iter(json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]
                     .values()))["weights"]
    bits, out = args["num_bits"], {}
    for name, value in stored.items():
        if not name.endswith(".weight_scale"):
            continue
        prefix = name.removesuffix(".weight_scale")
        if f"{prefix}.weight_packed" in stored:
            shape = torch.Size(stored[f"{prefix}.weight_shape"].tolist())
            codes = unpack_from_int32(stored[f"{prefix}.weight_packed"], bits, shape).double()
        else:
            codes = stored[f"{prefix}.weight"].double()
        scale = value.double()
        zero = stored.get(f"{prefix}.weight_zero_point")
        if zero is not None and not args["symmetric"] and f"{prefix}.weight_packed" in stored:
            zero = unpack_from_int32(zero, bits, torch.Size([codes.shape[0], scale.shape[1]]), packed_dim=0)
        zero = torch.zeros_like(scale) if zero is None or args["symmetric"] else zero.double()
        spread = codes.shape[1] // scale.shape[1]
        out[f"{prefix}.weight"] = (codes - zero.repeat_interleave(spread, 1)) * scale.repeat_interleave(spread, 1)
    assert out
    return {**{k: v.double() for k, v in stored.items() if not k.startswith(tuple(
        n.removesuffix(".weight_scale") + "." for n in stored if n.endswith(".weight_scale")))}, **out}


@pytest.fixture(scope="session")
def formats(models_dir, plains) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """Each format's checkpoint of plains[0], and its weights dequantized in float64 by a reference."""
    root = models_dir / "q-formats"
    root.mkdir()
    plain = plains[0]
    found = {}
    for name, kwargs in {"int4 group": {}, "int4 asymmetric": {"symmetric": False},
                         "int4 asymmetric channel": {"symmetric": False, "strategy": "channel", "group": None},
                         "int8": {"format": "int-quantized", "bits": 8, "strategy": "channel", "group": None},
                         "fp8 channel": {"format": "float-quantized", "bits": 8, "kind": "float",
                                         "strategy": "channel", "group": None}}.items():
        path = quantized.compressed_tensors(root / name.replace(" ", "-"), plain, **kwargs)
        found[f"compressed-tensors {name}"] = (path, decompressed(path))
    found["GPTQ"] = quantized.gptq(root / "gptq", plain)
    found["GPTQ act-order asymmetric"] = quantized.gptq(root / "gptq-act", plain, act_order=True, symmetric=False)
    found["AWQ"] = quantized.awq(root / "awq", plain)
    path = quantized.fp8_block(root / "fp8", plain, block=TILE)
    found["fp8 block"] = (path, fp8_reference(path))
    plain_tensors = {name: value.double() for name, value in load_file(plain / "model.safetensors").items()}
    return {name: (path, {**plain_tensors, **weights}) for name, (path, weights) in found.items()}


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_within_one_unit(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert int(units_off(got[name], value).max()) <= 1, name


# ---------------------------------------------------------------------------------------------
# Reading: each format merges as its dequantized weights


@pytest.mark.parametrize("name", ["compressed-tensors int4 group", "compressed-tensors int4 asymmetric",
                                  "compressed-tensors int4 asymmetric channel", "compressed-tensors int8",
                                  "compressed-tensors fp8 channel", "GPTQ", "GPTQ act-order asymmetric", "AWQ",
                                  "fp8 block"])
def test_each_format_merges_as_its_dequantized_weights(formats, plains, tmp_path, name):
    """int4 pack-quantized and GPTQ inputs used to give an output without tensors (exit 0), fp8 block
    inputs an internal error: each is now the average of its dequantized weights with a plain model."""
    path, weights = formats[name]
    got = load(merged(tmp_path, "average", [path, plains[1]], weights=[0.25, 0.75]))
    other = {k: v.double() for k, v in load(plains[1]).items()}
    assert_within_one_unit(got, {k: 0.25 * weights[k] + 0.75 * other[k] for k in other})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config  # plain float32 weights: no loader may dequantize them again


def test_a_block_of_rows_is_dequantized_as_the_whole_tensor_is(formats, tmp_path, monkeypatch):
    """Streamed in blocks of 3 rows on two threads (GPTQ and AWQ read their packed columns once per pass)."""
    from mergecli.methods import base as method_base

    monkeypatch.setattr(method_base, "BLOCK_ELEMENTS", 3 * 32)
    for name in ("GPTQ act-order asymmetric", "AWQ", "fp8 block", "compressed-tensors int4 asymmetric"):
        path, weights = formats[name]
        got = load(merged(tmp_path / name.replace(" ", "-"), "average", [path]))
        assert_within_one_unit(got, weights)


def test_models_in_different_formats_merge_together(formats, tmp_path):
    names = ["GPTQ", "AWQ", "compressed-tensors int4 group", "fp8 block"]
    got = load(merged(tmp_path, "average", [formats[n][0] for n in names], dtype="auto"))
    want = {k: sum(formats[n][1][k] for n in names) / 4 for k in formats["GPTQ"][1]}
    for name, value in want.items():  # bfloat16: every element within one unit of the correctly rounded value
        assert got[name].dtype == (torch.bfloat16 if name.endswith("proj.weight") else torch.float32), name
        assert int(units_off(got[name], value).max()) <= 1, name


@pytest.mark.parametrize("case", ["ties", "task_arithmetic", "della", "model_stock", "tsv"])
def test_task_vector_methods_over_fp8_inputs_are_their_formulas_over_the_dequantized_weights(models_dir, plains,
                                                                                            tmp_path, case):
    """TIES used to merge the stored fp8 values and their scales as weights (60-70% of the elements wrong)."""
    table, per_model, count, _, reference = CASES[case]
    fine_tuned = [quantized.fp8_block(tmp_path / f"fp8-{i}", plain, block=TILE) for i, plain in enumerate(plains)]
    weights = [1.0, 0.5, 2.0][:count]
    lines = [f'method = "{case}"', f'output = "{tmp_path / "out"}"', 'dtype = "float32"', "[base]",
             f'path = "{plains[0]}"', f"[{case}]", *[line for line in table.splitlines() if "normalize" not in line]]
    for path, weight in zip(fine_tuned, weights):
        lines += ["[[models]]", f'path = "{path}"', f"weight = {weight}", per_model]
    (tmp_path / "recipe.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", tmp_path / "recipe.toml")
    assert result.exit_code == 0, result.output
    got = load(tmp_path / "out")
    base = {k: v.double() for k, v in load(plains[0]).items()}
    models = [fp8_reference(path) for path in fine_tuned]
    for name, value in base.items():
        want = reference(value, [m[name] for m in models], name, weights)
        assert int(units_off(got[name], want).max()) <= 1, name


def test_gpt_oss_mxfp4_experts_merge_in_the_class_layout(models_dir, tmp_path):
    """gpt-oss stores its fused experts as MXFP4 [E, out, in/32, 16] blocks; the class (and the output)
    holds them as [E, in, out]. TIES over two MXFP4 fine-tunes of a plain base is TIES over the decoded values."""
    base = quantized.build_gpt_oss(tmp_path / "base", seed=50)
    tuned = [quantized.mxfp4_gpt_oss(tmp_path / f"mx-{i}", quantized.build_gpt_oss(tmp_path / f"p-{i}", seed=51 + i))
             for i in range(2)]
    table, per_model, count, _, reference = CASES["ties"]
    lines = ['method = "ties"', f'output = "{tmp_path / "out"}"', 'dtype = "float32"', "[base]", f'path = "{base}"',
             "[ties]", table]
    for (path, _), weight in zip(tuned, (1.0, 0.5)):
        lines += ["[[models]]", f'path = "{path}"', f"weight = {weight}"]
    (tmp_path / "recipe.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", tmp_path / "recipe.toml")
    assert result.exit_code == 0, result.output
    got = load(tmp_path / "out")
    plain = {k: v.double() for k, v in load(base).items()}
    models = [{**{k: v.double() for k, v in load_file(p / "model.safetensors").items()}, **decoded}
              for p, decoded in tuned]
    assert got["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 128)
    for name, value in plain.items():
        want = reference(value, [m[name] for m in models], name, [1.0, 0.5])
        assert int(units_off(got[name], want).max()) <= 1, name
    from transformers import GptOssForCausalLM

    GptOssForCausalLM.from_pretrained(tmp_path / "out")  # loads: every weight of the class is there


# ---------------------------------------------------------------------------------------------
# Writing fp8 block-scaled


def requantized(merge: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 merge requantized in float64 as transformers' Fp8Quantize does (448 / max|w| per tile):
    the fp8 values and the dequantized result."""
    rows, cols = merge.shape
    tiles = merge.float().double().reshape(rows // tile, tile, cols // tile, tile)
    largest = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(largest > 0, 448 / largest, 1.0)[:, None, :, None]
    values = (tiles * scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return values.reshape(rows, cols), (values.double() / scale).reshape(rows, cols)


def test_an_average_of_fp8_models_is_fp8_with_their_blocks_requantized_from_the_float32_merge(plains, tmp_path):
    models = [quantized.fp8_block(tmp_path / f"fp8-{i}", plain, block=TILE) for i, plain in enumerate(plains[:2])]
    out = merged(tmp_path, "average", models, dtype="auto", weights=[0.3, 0.7])
    got = load(out)
    inputs = [fp8_reference(path) for path in models]
    stored = load(models[0])
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == {k: (v.dtype, v.shape) for k, v in stored.items()}
    written = fp8_reference(out)
    codes_off = total = 0
    for name, value in stored.items():
        if name.endswith("weight_scale_inv"):
            continue
        merge = 0.3 * inputs[0][name] + 0.7 * inputs[1][name]
        if value.dtype != torch.float8_e4m3fn:
            assert int(units_off(got[name], merge).max()) <= 1, name
            continue
        values, dequantized = requantized(merge, TILE)
        # the scale is rounded to float32 once (1/s): the values are those of the float64 requantization but
        # where the merge falls within a float32 unit of a rounding boundary between two fp8 values
        codes_off += int((got[name].view(torch.uint8) != values.view(torch.uint8)).sum())
        total += values.numel()
        assert torch.allclose(written[name], dequantized, rtol=2**-20, atol=0), name
    assert codes_off <= total * 1e-4
    config = json.loads((out / "config.json").read_text())
    source = json.loads((models[0] / "config.json").read_text())["quantization_config"]
    assert config["quantization_config"]["weight_block_size"] == [TILE, TILE]
    assert config["quantization_config"] == {**source, "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_transformers_loads_the_fp8_output_and_its_logits_follow_the_bf16_merge(plains, tmp_path):
    """transformers dequantizes an fp8 checkpoint to bf16 on a CPU: its logits stay within fp8's error
    (3 mantissa bits: each weight within 2^-4 of its value) of the same merge written in bf16."""
    from transformers import AutoModelForCausalLM

    models = [quantized.fp8_block(tmp_path / f"fp8-{i}", plain, block=TILE) for i, plain in enumerate(plains[:2])]
    fp8 = merged(tmp_path / "fp8", "average", models, dtype="auto")
    bf16 = merged(tmp_path / "bf16", "average", models, dtype="bfloat16")
    tokens = torch.tensor([[1, 5, 9, 20, 33, 47, 60, 71]])
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)(tokens).logits.double()
                  for path in (fp8, bf16)]
    spread = float(logits[1].std())
    assert float((logits[0] - logits[1]).abs().max()) <= 0.25 * spread, (logits[0] - logits[1]).abs().max()
    assert not torch.equal(logits[0], logits[1])  # the fp8 model is the one loaded, not a bf16 copy


def test_float8_output_is_asked_for_from_plain_inputs(tmp_path):
    """dtype = "float8_e4m3fn": every linear weight of the blocks in 128 × 128 tiles, the rest bf16."""
    from transformers import LlamaForCausalLM

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        LlamaForCausalLM(llama_config(hidden=128, intermediate=256, layers=1)).save_pretrained(tmp_path / f"m{seed}")
        word_tokenizer(128).save_pretrained(tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    out = merged(tmp_path, "average", paths, dtype="float8_e4m3fn")
    got = load(out)
    fp8 = sorted(name for name, value in got.items() if value.dtype == torch.float8_e4m3fn)
    assert fp8 == sorted(name for name, value in got.items() if name.endswith("proj.weight")
                         and value.shape[0] % 128 == 0 and value.shape[1] % 128 == 0)
    assert len(fp8) == 5  # q and o (128 × 128), gate, up and down; k and v (64 rows) are not whole tiles
    assert all(got[name.replace(".weight", ".weight_scale_inv")].shape == (got[name].shape[0] // 128,
                                                                            got[name].shape[1] // 128) for name in fp8)
    assert {value.dtype for name, value in got.items() if "proj" not in name} == {torch.bfloat16}
    assert {got[name].dtype for name in ("model.layers.0.self_attn.k_proj.weight",
                                         "model.layers.0.self_attn.v_proj.weight")} == {torch.bfloat16}
    inputs = [{k: v.double() for k, v in load(p).items()} for p in paths]
    stored = {name: value for name, value in got.items()}
    for name in fp8:
        _, dequantized = requantized((inputs[0][name] + inputs[1][name]) / 2, 128)
        mine = stored[name].double() * stored[name.replace(".weight", ".weight_scale_inv")].double() \
            .repeat_interleave(128, 0).repeat_interleave(128, 1)
        assert torch.allclose(mine, dequantized, rtol=2**-20, atol=0), name
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["weight_block_size"] == [128, 128] and config["quant_method"] == "fp8"


def test_dry_run_says_what_is_dequantized_and_requantized(formats, plains, tmp_path):
    fp8 = formats["fp8 block"][0]
    result = cli("average", "-m", fp8, "-m", formats["GPTQ"][0], "--dry-run", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "fp8: 14 tensors stored as fp8 block-scaled are dequantized as they are read" in result.output
    assert "gptq: 14 tensors stored as GPTQ are dequantized as they are read" in result.output
    assert "14 tensors are written as fp8 e4m3 with a scale per 16×16 block" in result.output
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# RegMean, and --stream


def dequantized_copy(path: Path, weights: dict[str, torch.Tensor], target: Path, dtype: torch.dtype) -> Path:
    """The checkpoint with its weights dequantized, stored plain (no quantization_config): the quantized
    ones in `dtype` (where their values are exact), the others as they were (float32)."""
    shutil.copytree(path, target, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
    plain = {name for name in load_file(path / "model.safetensors")}
    save_file({k: v.to(torch.float32 if k in plain else dtype).contiguous() for k, v in weights.items()},
              target / "model.safetensors",
              metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_regmean_over_quantized_inputs_is_regmean_over_their_dequantized_weights(formats, tmp_path, method):
    (tmp_path / "data.txt").write_text("the model merge weight layer token data\nthe a of to and in is\n" * 6)
    sources = [formats["fp8 block"], formats["GPTQ act-order asymmetric"]]
    copies = [dequantized_copy(path, weights, tmp_path / f"copy-{i}", dtype)  # fp8 × float32 scale: float64
              for i, ((path, weights), dtype) in enumerate(zip(sources, (torch.float64, torch.float32)))]

    def run(name: str, paths: list[Path]) -> dict[str, torch.Tensor]:
        lines = ['method = "regmean"', f'output = "out-{name}"', 'dtype = "float32"']
        for path, model in zip(paths, ("a", "b")):
            lines += ["[[models]]", f'path = "{path}"', f'name = "{model}"', 'data = "data.txt"']
        lines += ["[regmean]", f'stats_dir = "stats-{name}"', "num_examples = 8", "batch_size = 4",
                  "max_length = 12"]
        if method == "regmean_plusplus":
            lines += ["sequential = true"]
        (tmp_path / f"{name}.toml").write_text("\n".join(lines) + "\n")
        if method == "regmean":
            assert cli("regmean", "collect-stats", tmp_path / f"{name}.toml").exit_code == 0
        result = cli("regmean", "merge", tmp_path / f"{name}.toml")
        assert result.exit_code == 0, result.output
        return load(tmp_path / f"out-{name}")

    got, want = run("quantized", [p for p, _ in sources]), run("copies", copies)
    assert set(got) == set(want)
    for name in want:  # the same values in: the same result, within float32's rounding of the solve
        scale = float(want[name].abs().max())
        assert torch.allclose(got[name], want[name], rtol=0, atol=scale * 2**-22), name



def test_fp8_inputs_stream_from_the_hub_as_they_merge_from_local_files(fake_hub, formats, plains, tmp_path):
    """--stream: each block's fp8 rows and its tiles' scales are fetched by range requests; the merge and
    RegMean's statistics and merge are those of the local files."""
    from test_hub_stream import collect_and_merge_both_ways

    from fakehub import repo_files

    models = [quantized.fp8_block(tmp_path / f"fp8-{i}", plain, block=TILE) for i, plain in enumerate(plains[:2])]
    for repo, path in zip(("org/fp8-a", "org/fp8-b"), models):
        fake_hub.add_repo(repo, repo_files(path))
    local = cli("average", "-m", models[0], "-m", models[1], "-o", tmp_path / "local")
    streamed = cli("average", "-m", "org/fp8-a", "-m", "org/fp8-b", "--stream", "-o", tmp_path / "streamed")
    assert local.exit_code == 0 and streamed.exit_code == 0, streamed.output
    assert load(tmp_path / "local").keys() == load(tmp_path / "streamed").keys()
    assert all(torch.equal(value.view(torch.uint8), load(tmp_path / "streamed")[name].view(torch.uint8))
               for name, value in load(tmp_path / "local").items())
    collect_and_merge_both_ways(tmp_path, models, ["org/fp8-a", "org/fp8-b"])


# ---------------------------------------------------------------------------------------------
# Refused in one line


def assert_refused(result, words: str) -> None:
    assert result.exit_code == 1, result.output
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and words in first, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


def edited(path: Path, target: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(path, target)
    if config is not None:
        settings = json.loads((target / "config.json").read_text())
        config(settings["quantization_config"])
        (target / "config.json").write_text(json.dumps(settings))
    if tensors is not None:
        stored = load_file(target / "model.safetensors")
        tensors(stored)
        save_file(stored, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_block_size_that_does_not_match_the_scales_is_refused(formats, tmp_path):
    model = edited(formats["fp8 block"][0], tmp_path / "m", config=lambda q: q.update(weight_block_size=[32, 32]))
    assert_refused(cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", tmp_path / "out"),
                   "is [2, 4], where weight_block_size [32, 32] over [32, 64] asks for [1, 2]")


def test_a_config_whose_tensors_do_not_match_it_is_refused(formats, tmp_path):
    """A GPTQ config over fp8 tensors: the fp8 values are part of no GPTQ weight."""
    model = edited(formats["fp8 block"][0], tmp_path / "m",
                   config=lambda q: (q.clear(), q.update(quant_method="gptq", bits=4, group_size=16)))
    (tmp_path / "recipe.toml").write_text(f'output = "out"\n[[models]]\npath = "{model}"\n[[models]]\n'
                                          f'path = "{model}"\nname = "b"\n')
    assert_refused(cli("validate", tmp_path / "recipe.toml"),
                   "is part of no quantized weight that its quantization_config describes")


def test_a_missing_part_is_refused(formats, tmp_path):
    def drop(stored):
        del stored["model.layers.0.self_attn.q_proj.scales"]

    model = edited(formats["GPTQ"][0], tmp_path / "m", tensors=drop)
    assert_refused(cli("average", "-m", model, "-m", model, "--name", "a", "--name", "b", "-o", tmp_path / "out"),
                   "tensor 'model.layers.0.self_attn.q_proj.scales', which its format stores beside the others, "
                   "is missing")
    assert not (tmp_path / "out").exists()
