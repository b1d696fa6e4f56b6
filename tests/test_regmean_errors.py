"""Bad input to `regmean collect-stats`: one clear message, the right exit code, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clirunner import cli
from references import random_texts, write_images, write_recipe, write_txt

SETTINGS = {"num_examples": 8, "batch_size": 4, "max_length": 16}


def run(recipe: Path, *args: str):
    result = cli("regmean", "collect-stats", recipe, *args)
    assert "Traceback" not in result.output
    return result


def assert_no_stats(tmp_path: Path) -> None:
    stats = tmp_path / "stats"
    assert not stats.exists() or not any(stats.iterdir()), list(stats.iterdir())


def test_missing_data_file(tmp_path, llama_models, text_data):
    missing = tmp_path / "no.txt"
    recipe = write_recipe(tmp_path / "r.toml", [(llama_models[0], text_data[0]), (llama_models[1], missing)],
                          settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 2, result.output
    assert "models.1 (m1).data" in result.output and "no.txt does not exist" in result.output
    assert_no_stats(tmp_path)  # the data of every model is checked before the first is run


def test_empty_data_file(tmp_path, llama_models, text_data):
    empty = write_txt(tmp_path / "empty.txt", [])
    recipe = write_recipe(tmp_path / "r.toml", [(llama_models[0], text_data[0]), (llama_models[1], empty)],
                          settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 1, result.output
    assert "empty.txt holds no calibration examples" in result.output
    assert_no_stats(tmp_path)


def test_model_without_data(tmp_path, llama_models, text_data):
    recipe = write_recipe(tmp_path / "r.toml", [(llama_models[0], text_data[0]), (llama_models[1], None)],
                          settings=SETTINGS)
    for command in (["regmean", "collect-stats"], ["regmean", "merge"], ["validate"]):
        result = cli(*command, recipe)
        assert result.exit_code == 2, result.output
        assert "models.1 (m1): no calibration `data`" in result.output
    assert_no_stats(tmp_path)
    assert not (tmp_path / "out").exists()


def test_fewer_examples_than_asked_warns_and_uses_them(tmp_path, llama_models):
    few = write_txt(tmp_path / "few.txt", random_texts(5, 3))
    recipe = write_recipe(tmp_path / "r.toml", [(llama_models[0], few)], settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 0, result.output
    assert "has 3 examples, fewer than num_examples = 8" in result.output
    meta = json.loads((tmp_path / "stats" / "m0" / "stats.json").read_text())
    assert meta["examples"] == 3 and meta["data"]["num_examples"] == 8


def test_max_length_beyond_the_model_is_clipped(tmp_path, gpt2_models):
    long = write_txt(tmp_path / "long.txt", [" ".join(["the"] * 100)])
    recipe = write_recipe(tmp_path / "r.toml", [(gpt2_models[0], long)], settings={"max_length": 512})
    result = run(recipe)
    assert result.exit_code == 0, result.output
    assert "more than the model's 64 positions" in result.output
    assert json.loads((tmp_path / "stats" / "m0" / "stats.json").read_text())["tokens"] == 64


def test_model_with_no_linear_layers(tmp_path, clip_models):
    from transformers import CLIPImageProcessor, ResNetConfig, ResNetModel

    resnet = tmp_path / "resnet"
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
                ).save_pretrained(resnet)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(resnet)
    images = write_images(tmp_path / "images", 2, seed=3)
    recipe = write_recipe(tmp_path / "r.toml", [(resnet, images)], settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 1, result.output
    assert "has no linear layers" in result.output and "mergecli average" in result.output
    assert_no_stats(tmp_path)


def test_unknown_model_name_and_device(tmp_path, llama_models, text_data):
    recipe = write_recipe(tmp_path / "r.toml", list(zip(llama_models, text_data)), settings=SETTINGS)
    result = run(recipe, "--only", "nope")
    assert result.exit_code == 2 and "--only nope: no such model" in result.output
    result = run(recipe, "--model", "nope")  # its name before 0.3
    assert result.exit_code == 2 and "--model is now --only" in result.output
    result = run(recipe, "--device", "tpu")
    assert result.exit_code == 2 and "expected cpu, cuda or cuda:N" in result.output
    if not torch.cuda.is_available():
        result = run(recipe, "--device", "cuda")
        assert result.exit_code == 2 and "no CUDA device" in result.output
    assert_no_stats(tmp_path)


@pytest.mark.parametrize("sequential", [False, True])
def test_both_merges_take_the_device_of_collect_stats(tmp_path, llama_models, text_data, sequential):
    """`regmean merge --device` (RegMean++ runs every model during the merge): checked like
    collect-stats', before anything runs; on the CPU it gives the same merge as without the flag."""
    recipe = write_recipe(tmp_path / "r.toml", list(zip(llama_models, text_data)),
                          settings={**SETTINGS, "sequential": sequential})
    if not sequential:
        assert run(recipe).exit_code == 0
    for device, words in (("tpu", "expected cpu, cuda or cuda:N"), ("cuda:7", "CUDA device")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        result = cli("regmean", "merge", recipe, "-o", tmp_path / "bad", "--device", device)
        assert result.exit_code == 2 and words in result.stderr, result.output
        assert not (tmp_path / "bad").exists()
    plain = cli("regmean", "merge", recipe, "-o", tmp_path / "plain")
    on_cpu = cli("regmean", "merge", recipe, "-o", tmp_path / "cpu", "--device", "cpu:0")
    assert plain.exit_code == 0 and on_cpu.exit_code == 0, on_cpu.output
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("plain", "cpu")]
    assert weights[0] == weights[1]


def test_text_data_for_an_image_model(tmp_path, clip_models, text_data):
    recipe = write_recipe(tmp_path / "r.toml", [(clip_models[0], text_data[0])], settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 1, result.output
    assert "tokenizer" in result.output
    assert_no_stats(tmp_path)


def test_single_weights_file_cannot_be_run(tmp_path, llama_models, text_data):
    recipe = write_recipe(tmp_path / "r.toml", [(llama_models[0] / "model.safetensors", text_data[0])],
                          settings=SETTINGS)
    result = run(recipe)
    assert result.exit_code == 1, result.output
    assert "not a model directory with config.json" in result.output
