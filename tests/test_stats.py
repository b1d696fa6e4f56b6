"""`regmean collect-stats` against independent float64 recomputations, and the stats files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clirunner import cli
from mergecli.io.checkpoint import open_checkpoint
from mergecli.stats import grams
from mergecli.stats.grams import GramCollector
from references import (
    first_examples,
    image_inputs,
    layer_inputs,
    read_stats,
    shard_metadata,
    text_inputs,
    unpack_upper,
    write_recipe,
    write_txt,
)

MAX_LENGTH = 16


def collect(tmp_path: Path, models: list[Path], data: list[Path], **settings) -> Path:
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(models, data)), settings=settings)
    result = cli("regmean", "collect-stats", recipe)
    assert result.exit_code == 0, result.output
    return tmp_path / "stats"


def assert_matches_reference(stats: Path, reference: dict[str, torch.Tensor], *, not_hooked: set[str] = frozenset(),
                             orientation: str = "out_in") -> dict:
    """Every hooked layer's Gram equals XᵀX of its own captured inputs, token counts included."""
    meta, grams = read_stats(stats)
    assert set(meta["layers"]) == {f"{m}.weight" for m in reference} - not_hooked
    for weight, entry in meta["layers"].items():
        x = reference[weight.removesuffix(".weight")]  # (tokens, d_in), float64
        expected = x.T @ x
        assert entry["tokens"] == x.shape[0], weight
        assert entry["orientation"] == orientation or weight.startswith(("lm_head", "classifier")), weight
        gram = grams[entry["gram"]]
        assert gram.dtype == torch.float64
        torch.testing.assert_close(gram, expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()), msg=weight)
    return meta


def test_llama_stats_equal_unpadded_float64_recomputation(tmp_path, llama_models, text_data):
    # 16 examples of 1..30 words, truncated to 16 tokens, in padded batches of 3 uneven lengths
    stats = collect(tmp_path, llama_models, text_data, num_examples=16, batch_size=3, max_length=MAX_LENGTH)
    for model, data, name in zip(llama_models, text_data, ["m0", "m1"]):
        inputs = text_inputs(model, first_examples(data, 16), max_length=MAX_LENGTH)
        assert len(inputs) == 16 and any(len(i["input_ids"][0]) == MAX_LENGTH for i in inputs)
        meta = assert_matches_reference(stats / name, layer_inputs(model, inputs))
        assert meta["tokens"] == sum(i["input_ids"].shape[1] for i in inputs)
        assert meta["examples"] == 16
    meta, grams = read_stats(stats / "m0")
    # q/k/v read one tensor, gate/up another: 4 Grams per decoder layer, plus lm_head's input
    assert len(grams) == 2 * 4 + 1
    layer = {w: e["gram"] for w, e in meta["layers"].items()}
    assert layer["model.layers.0.self_attn.q_proj.weight"] == layer["model.layers.0.self_attn.v_proj.weight"]
    assert layer["model.layers.1.mlp.gate_proj.weight"] == layer["model.layers.1.mlp.up_proj.weight"]
    assert layer["model.layers.1.mlp.up_proj.weight"] != layer["model.layers.1.mlp.down_proj.weight"]


def test_gpt2_conv1d_stats(tmp_path, gpt2_models, text_data):
    stats = collect(tmp_path, gpt2_models, text_data, num_examples=12, batch_size=5, max_length=MAX_LENGTH)
    inputs = text_inputs(gpt2_models[1], first_examples(text_data[1], 12), max_length=MAX_LENGTH)
    # lm_head is tied to the token embeddings: no weight of its own, so not hooked
    meta = assert_matches_reference(stats / "m1", layer_inputs(gpt2_models[1], inputs), not_hooked={"lm_head.weight"},
                                    orientation="in_out")
    assert meta["layers"]["transformer.h.0.attn.c_attn.weight"]["in_features"] == 32


def test_bert_classifier_stats(tmp_path, bert_models, text_data):
    stats = collect(tmp_path, bert_models, text_data, num_examples=10, batch_size=4, max_length=MAX_LENGTH)
    inputs = text_inputs(bert_models[0], first_examples(text_data[0], 10), max_length=MAX_LENGTH)
    meta = assert_matches_reference(stats / "m0", layer_inputs(bert_models[0], inputs))
    # pooler and classifier read one vector per example
    assert meta["layers"]["bert.pooler.dense.weight"]["tokens"] == 10
    assert meta["layers"]["classifier.weight"]["tokens"] == 10


def test_clip_vision_stats_from_image_folder(tmp_path, clip_models, image_data):
    stats = collect(tmp_path, clip_models, image_data, num_examples=7, batch_size=3)
    reference = layer_inputs(clip_models[1], image_inputs(clip_models[1], image_data[1]))
    meta = assert_matches_reference(stats / "m1", reference)
    assert meta["tokens"] == 7 * (1 + (32 // 8) ** 2)  # class token + patches, all real
    assert meta["data"]["kind"] == "image"


def test_stats_metadata_and_one_file_per_stage(tmp_path, llama_models, text_data):
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 5, "max_length": 8})
    result = cli("regmean", "collect-stats", recipe, "--only", "m1")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "stats" / "m0").exists()  # --only picks models
    directory = tmp_path / "stats" / "m1"
    # block 0, block 1, and lm_head after the last block (the embeddings have no linear layer)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    assert files == ["grams-00001.safetensors", "grams-00002.safetensors", "grams-00003.safetensors"]
    assert set(load_file(directory / files[2])) == {"lm_head"}
    meta = json.loads((directory / "stats.json").read_text())
    with open_checkpoint(str(llama_models[1])) as checkpoint:
        fingerprint = checkpoint.fingerprint()
    assert meta["fingerprint"] == fingerprint
    assert meta["format_version"] == 3 and meta["packing"] == "upper" and meta["mergecli_version"]
    assert meta["data"]["num_examples"] == 5 and meta["data"]["max_length"] == 8
    for file in directory.glob("*.safetensors"):  # upper triangles: d(d+1)/2 float64 values each
        assert all(t.dtype == torch.float64 and t.shape in ((32 * 33 // 2,), (64 * 65 // 2,))
                   for t in load_file(file).values())
    header = shard_metadata(directory)
    assert header["fingerprint"] == fingerprint and header["mergecli_stats_format"] == "3"
    assert [p.name for p in (tmp_path / "stats").iterdir()] == ["m1"]  # no temporary directory left


@pytest.mark.parametrize("flag", [[], ["--force"]])
def test_up_to_date_stats_are_skipped_unless_forced(tmp_path, llama_models, text_data, flag):
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 4, "max_length": 8})
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    gram_file = tmp_path / "stats" / "m0" / "grams-00001.safetensors"
    before = gram_file.stat().st_mtime_ns
    result = cli("regmean", "collect-stats", recipe, *flag)
    assert result.exit_code == 0, result.output
    if flag:
        assert gram_file.stat().st_mtime_ns != before
        assert "up to date" not in result.output
    else:
        assert gram_file.stat().st_mtime_ns == before
        assert result.output.count("up to date") == 2


def test_changed_data_settings_recompute(tmp_path, llama_models, text_data):
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 4, "max_length": 8})
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    result = cli("regmean", "collect-stats", recipe, "--set", "regmean.num_examples=6")
    assert result.exit_code == 0, result.output
    assert "up to date" not in result.output
    assert json.loads((tmp_path / "stats" / "m0" / "stats.json").read_text())["examples"] == 6


class TwoBranches(torch.nn.Module):
    """`a` and `b` read the same input; `c` reads `a`'s output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(40, 20), torch.nn.Linear(40, 30), torch.nn.Linear(20, 5)

    def forward(self, x):
        return self.c(self.a(x)) + self.b(x)[..., :5]


@pytest.mark.parametrize("block", [8, 256])  # 8: several block rows of the upper triangle
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: staged, then added in float64
def test_gram_collector_blocks_masks_and_shares(block, dtype, monkeypatch):
    monkeypatch.setattr(grams, "GRAM_BLOCK", block)
    torch.manual_seed(0)
    model = TwoBranches().to(dtype)
    modules = {"a": model.a, "b": model.b, "c": model.c}
    xs = [torch.randn(3, 7, 40, dtype=dtype) for _ in range(5)]  # 5 × 21 rows: flushed at 40 and 20 rows
    masks = [torch.arange(7)[None, :] < torch.tensor([[7], [2], [5]])] + [torch.ones(3, 7, dtype=torch.bool)] * 4
    with GramCollector(modules) as collector, torch.inference_mode():
        for x, mask in zip(xs, masks):
            collector.begin_batch(mask)
            model(x)
    assert collector.gram_of == {"a": "a", "b": "a", "c": "c"}
    real = torch.cat([x[m] for x, m in zip(xs, masks)]).double()  # (14 + 4 × 21, 40)
    hidden = model.double().a(real).detach()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for key, rows in (("a", real), ("c", hidden)):
        expected = rows.T @ rows
        torch.testing.assert_close(unpack_upper(collector.sums[key].packed()), expected, rtol=tol,
                                   atol=tol * float(expected.abs().max()))
    assert {key: s.tokens for key, s in collector.sums.items()} == {"a": 98, "c": 98}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stats_equal_cpu_stats(tmp_path, llama_models, text_data):
    """--device cuda (zeroed padding rows, GPU matmuls) gives the CPU's Gram sums and token counts."""
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 16, "batch_size": 3, "max_length": MAX_LENGTH})
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    cpu_meta, cpu_grams = read_stats(tmp_path / "stats" / "m0")
    result = cli("regmean", "collect-stats", recipe, "--device", "cuda", "--force")
    assert result.exit_code == 0, result.output
    gpu_meta, gpu_grams = read_stats(tmp_path / "stats" / "m0")
    assert gpu_meta["layers"] == cpu_meta["layers"] and gpu_meta["tokens"] == cpu_meta["tokens"]
    for key, gram in cpu_grams.items():
        torch.testing.assert_close(gpu_grams[key], gram, rtol=1e-4, atol=1e-4 * float(gram.abs().max()), msg=key)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """A float64 LLaMA: sums are exact enough that batching and summation order do not show."""
    from builders import build_llama

    return build_llama(tmp_path_factory.mktemp("llama64") / "llama", seed=41, dtype=torch.float64)


def collected(tmp_path: Path, model: Path, data: Path, stats_dir: str, *options: str) -> Path:
    recipe = write_recipe(tmp_path / f"{stats_dir}.toml", [(model, data)], names=["m"],
                          settings={"num_examples": 16, "batch_size": 3, "max_length": MAX_LENGTH,
                                    "stats_dir": stats_dir})
    result = cli("regmean", "collect-stats", recipe, *options)
    assert result.exit_code == 0, result.output
    return tmp_path / stats_dir / "m"


def test_a_small_memory_budget_spills_hidden_states_and_changes_nothing(tmp_path, llama64, text_data):
    in_memory = collected(tmp_path, llama64, text_data[0], "ram")
    spilled = collected(tmp_path, llama64, text_data[0], "disk", "--memory-budget", "1KB")
    meta, grams = read_stats(in_memory)
    spilled_meta, spilled_grams = read_stats(spilled)
    assert spilled_meta["layers"] == meta["layers"] and spilled_meta["tokens"] == meta["tokens"]
    assert spilled_grams.keys() == grams.keys() and all(torch.equal(spilled_grams[k], g) for k, g in grams.items())
    recipe = tmp_path / "disk.toml"
    result = cli("regmean", "collect-stats", recipe, "--memory-budget", "1KB", "--force")
    assert "of hidden states spilled to disk" in result.stdout
    assert "of hidden states spilled" not in cli("regmean", "collect-stats", recipe, "--force").stdout
    assert [p.name for p in (tmp_path / "disk").iterdir()] == ["m"]  # the spill files are gone


def test_combined_halves_equal_the_whole(tmp_path, llama64, text_data):
    texts = first_examples(text_data[1], 16)
    whole = collected(tmp_path, llama64, write_txt(tmp_path / "all.txt", texts), "whole")
    parts = [collected(tmp_path, llama64, write_txt(tmp_path / f"half{i}.txt", half), f"part{i}")
             for i, half in enumerate((texts[:9], texts[9:]))]
    result = cli("regmean", "combine-stats", tmp_path / "sum" / "m", *parts)
    assert result.exit_code == 0, result.output
    assert "2 parts, 16 examples" in result.stdout
    meta, grams = read_stats(whole)
    summed_meta, summed = read_stats(tmp_path / "sum" / "m")
    assert (summed_meta["examples"], summed_meta["tokens"]) == (meta["examples"], meta["tokens"])
    assert meta["examples"] == 16
    assert summed_meta["layers"] == meta["layers"] and len(summed_meta["data"]["parts"]) == 2
    for key, gram in grams.items():
        torch.testing.assert_close(summed[key], gram, rtol=1e-12, atol=1e-12 * float(gram.abs().max()))
    # combined statistics are up to date for collect-stats, and merge with them
    recipe = write_recipe(tmp_path / "merge.toml", [(llama64, tmp_path / "all.txt")], names=["m"],
                          settings={"num_examples": 16, "max_length": MAX_LENGTH, "stats_dir": "sum"})
    assert "up to date" in cli("regmean", "collect-stats", recipe).output
    merged = cli("regmean", "merge", recipe)
    assert merged.exit_code == 0 and "data settings" not in merged.output, merged.output


def test_combine_refuses_other_models_and_an_existing_output(tmp_path, llama64, llama_models, text_data):
    mine = collected(tmp_path, llama64, text_data[0], "mine")
    other = collected(tmp_path, llama_models[0], text_data[0], "other")
    result = cli("regmean", "combine-stats", tmp_path / "sum", mine, other)
    assert result.exit_code == 1 and "are statistics of another model" in result.stderr, result.output
    assert not (tmp_path / "sum").exists()
    result = cli("regmean", "combine-stats", mine, mine, other)
    assert result.exit_code == 2 and "is one of the inputs" in result.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    result = cli("regmean", "combine-stats", tmp_path / "notes", mine, "--force")
    assert result.exit_code == 2 and "it holds todo.txt, which mergecli did not write" in result.stderr
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["collect-stats", "merge"])
def test_scratch_of_dead_runs_is_removed_by_the_next_run_of_any_kind(tmp_path, llama_models, text_data, command):
    """A killed RegMean++ merge leaves `.plusplus-PID`, a killed collect-stats `.spill-PID` (and a
    partial statistics directory): whichever command uses stats_dir next removes them all."""
    dead = 2**22 + 4321  # above the default pid_max: no such process
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(llama_models, text_data)),
                          settings={"num_examples": 4, "max_length": 8})
    stats = tmp_path / "stats"
    if command == "merge":
        assert cli("regmean", "collect-stats", recipe).exit_code == 0
    for leftover in (f".plusplus-{dead}/m0", f".spill-{dead}", f".m0.partial-{dead}"):
        (stats / leftover).mkdir(parents=True)
        (stats / leftover / "scratch.bin").write_bytes(b"x" * 100)
    alive = stats / ".spill-1"  # a live process's scratch (pid 1 runs as long as the machine) is left alone
    alive.mkdir()
    args = ["-o", tmp_path / "out"] if command == "merge" else []
    result = cli("regmean", command, recipe, *args)
    assert result.exit_code == 0, result.output
    assert f".plusplus-{dead}" in result.stderr and "left by an interrupted run" in result.stderr
    assert sorted(p.name for p in stats.iterdir()) == sorted(["m0", "m1", alive.name])
