"""`regmean merge` end to end: merged linear layers against least squares on the stacked
activations (computed here, in float64, from unpadded forward passes), the rest averaged."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers

from builders import build_clip_vision, build_gpt2, build_llama
from clirunner import cli
from mergecli import load_recipe
from mergecli.io.checkpoint import iter_row_blocks
from mergecli.merge.plan import plan_merge
from mergecli.merge.run import run_merge
from mergecli.methods.regmean import solve
from references import (
    first_examples,
    image_inputs,
    layer_inputs,
    load_dir,
    perturbed_copy,
    text_inputs,
    write_recipe,
)

MAX_LENGTH = 16
SETTINGS = {"num_examples": 16, "batch_size": 4, "max_length": MAX_LENGTH}


def collected(tmp_path: Path, models: list[Path], data: list[Path], *, settings=SETTINGS, extra: str = "") -> Path:
    recipe = write_recipe(tmp_path / "recipe.toml", list(zip(models, data)), settings=settings, extra=extra)
    result = cli("regmean", "collect-stats", recipe, "--quiet")
    assert result.exit_code == 0, result.output
    return recipe


@pytest.fixture(scope="session")
def llama_recipe(tmp_path_factory, llama_models, text_data) -> Path:
    """A regmean recipe over the two tiny LLaMAs, with statistics collected once."""
    return collected(tmp_path_factory.mktemp("llama-regmean"), llama_models, text_data)


# float64 checkpoints run in float64, so that the comparison with least squares is tight: in float32
# the normal equations of a layer with cond(X) = 1e3 already lose three digits.


@pytest.fixture(scope="session")
def llama64(rm_dir) -> list[Path]:
    return [build_llama(rm_dir / f"llama64-{i}", seed=90 + i, dtype=torch.float64) for i in range(2)]


@pytest.fixture(scope="session")
def gpt2_64(rm_dir) -> list[Path]:
    return [build_gpt2(rm_dir / f"gpt2-64-{i}", seed=92 + i, dtype=torch.float64) for i in range(2)]


@pytest.fixture(scope="session")
def clip64(rm_dir) -> list[Path]:
    return [build_clip_vision(rm_dir / f"clip64-{i}", seed=94 + i, dtype=torch.float64) for i in range(2)]


def activations(models: list[Path], data: list[Path]) -> list[dict[str, torch.Tensor]]:
    return [layer_inputs(m, text_inputs(m, first_examples(d, 16), max_length=MAX_LENGTH)) for m, d in zip(models, data)]


def least_squares(xs: list[torch.Tensor], targets: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """argmin_W Σ_i (w_i / n_i) ‖X_i W − T_i‖², by lstsq on rows scaled by sqrt(w_i / n_i)."""
    scales = [(w / x.shape[0]) ** 0.5 for x, w in zip(xs, weights)]
    a = torch.cat([s * x for s, x in zip(scales, xs)])
    b = torch.cat([s * t for s, t in zip(scales, targets)])
    return torch.linalg.lstsq(a, b, driver="gelsd").solution


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, msg: str) -> None:
    error = torch.linalg.norm(actual.double() - expected.double()) / torch.linalg.norm(expected.double())
    assert error < tol, f"{msg}: relative error {float(error):.2e}"


def test_llama_linear_layers_are_least_squares_fits(tmp_path, llama64, text_data, monkeypatch):
    recipe = collected(tmp_path, llama64, text_data)
    out = tmp_path / "out"
    result = cli("regmean", "merge", recipe, "-o", out, "--set", "regmean.reduce_non_diagonal_ratio=1.0",
                 "--set", "models.1.weight=3")
    assert result.exit_code == 0, result.output
    merged = load_dir(out)
    inputs = [load_dir(m) for m in llama64]
    xs = activations(llama64, text_data)
    weights = [0.25, 0.75]
    linear = [name for name in merged if name.endswith("proj.weight") or name == "lm_head.weight"]
    assert len(linear) == 2 * 7 + 1
    for name in linear:
        module = name.removesuffix(".weight")
        x = [a[module] for a in xs]
        expected = least_squares(x, [xi @ m[name].double().T for xi, m in zip(x, inputs)], weights).T
        assert_close_rel(merged[name], expected, 1e-9, name)
        # and not simply the average
        average = sum(w * m[name].double() for w, m in zip(weights, inputs))
        assert torch.linalg.norm(merged[name].double() - average) > 1e-3 * torch.linalg.norm(average)
    for name in set(merged) - set(linear):  # norms and embeddings: the weighted average
        average = sum(w * m[name].double() for w, m in zip(weights, inputs))
        torch.testing.assert_close(merged[name], average, rtol=1e-12, atol=1e-12, msg=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[4, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    assert "RegMean" in result.output and (out / "mergecli.toml").is_file()

    # the same merge with nn.Linear weights streamed a few rows at a time (Grams factored once)
    spec = load_recipe(recipe, overrides=["regmean.reduce_non_diagonal_ratio=1.0", "models.1.weight=3"])
    monkeypatch.setattr(solve, "BLOCK_ROWS", 3)  # 96 elements of 32 inputs
    plan = plan_merge(spec, output=tmp_path / "blocks")
    tasks = [t for t in plan.tasks if t.kind == "regmean"]
    assert all(len(list(iter_row_blocks(t.sources[0].tensors[t.out.name], t.block_elements))) > 3 for t in tasks)
    report = run_merge(plan)
    assert not report.warnings
    for name, tensor in load_dir(tmp_path / "blocks").items():
        # relative to the tensor: o_proj's Gram is ill-conditioned at this size, and the rounding
        # of its float64 solve depends on how many threads BLAS uses (1.4e-12 apart with 2 threads)
        assert_close_rel(tensor, merged[name], 1e-11, name)


def test_gpt2_conv1d_orientation(tmp_path, gpt2_64, text_data):
    recipe = collected(tmp_path, gpt2_64, text_data)
    out = tmp_path / "out"
    result = cli("regmean", "merge", recipe, "-o", out, "--set", "regmean.reduce_non_diagonal_ratio=1.0")
    assert result.exit_code == 0, result.output
    merged = load_dir(out)
    inputs = [load_dir(m) for m in gpt2_64]
    xs = activations(gpt2_64, text_data)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        name = f"transformer.h.1.{layer}.weight"  # Conv1D: stored [in, out], y = x W + b
        x = [a[f"transformer.h.1.{layer}"] for a in xs]
        expected = least_squares(x, [xi @ m[name].double() for xi, m in zip(x, inputs)], [0.5, 0.5])
        assert_close_rel(merged[name], expected, 1e-9, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[4, 5, 6]])).logits).all()


def closed_form(grams: list[torch.Tensor], tokens: list[int], weights_t: list[torch.Tensor], ratio: float):
    """(Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ written out directly, with G_i the per-token mean Gram."""
    tilde = []
    for gram, n in zip(grams, tokens):
        g = gram / n
        tilde.append(ratio * g + (1 - ratio) * torch.diag(torch.diag(g)))
    return torch.linalg.solve(sum(tilde), sum(g @ w for g, w in zip(tilde, weights_t)))


def test_clip_vision_merge_with_ratio(tmp_path, clip64, image_data):
    recipe = collected(tmp_path, clip64, image_data, settings={"num_examples": 7, "batch_size": 3,
                                                                     "reduce_non_diagonal_ratio": 0.6})
    out = tmp_path / "out"
    assert cli("regmean", "merge", recipe, "-o", out).exit_code == 0
    merged = load_dir(out)
    inputs = [load_dir(m) for m in clip64]
    xs = [layer_inputs(m, image_inputs(m, d)) for m, d in zip(clip64, image_data)]
    for module in ("encoder.layers.0.self_attn.k_proj", "encoder.layers.1.mlp.fc2"):
        name = f"{module}.weight"
        x = [a[module] for a in xs]
        expected = closed_form([xi.T @ xi for xi in x], [len(xi) for xi in x], [m[name].double().T for m in inputs],
                               0.6).T
        assert_close_rel(merged[name], expected, 1e-9, name)
    model = transformers.CLIPVisionModel.from_pretrained(out)
    pixels = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert torch.isfinite(model(pixel_values=pixels).last_hidden_state).all()
    assert (out / "preprocessor_config.json").is_file()


def test_exclude_and_base(tmp_path, bert_models, text_data):
    recipe = collected(tmp_path, bert_models, text_data, extra=f'exclude = ["classifier\\\\..*"]\n'
                                                              f'[base]\npath = "{bert_models[1]}"')
    out = tmp_path / "out"
    result = cli("regmean", "merge", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    merged, base = load_dir(out), load_dir(bert_models[1])
    assert torch.equal(merged["classifier.weight"], base["classifier.weight"])
    assert torch.equal(merged["classifier.bias"], base["classifier.bias"])
    assert not torch.equal(merged["bert.pooler.dense.weight"], base["bert.pooler.dense.weight"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model(torch.tensor([[4, 5, 6]])).logits.shape == (1, 3)


def test_dead_input_feature_is_reported_and_finite(tmp_path, llama_models, text_data):
    def silence_feature(tensors):
        tensors["model.layers.0.input_layernorm.weight"][5] = 0.0  # q/k/v input feature 5 is always 0

    models = [perturbed_copy(m, tmp_path / f"dead-{i}", seed=i, edit=silence_feature)
              for i, m in enumerate(llama_models)]
    recipe = collected(tmp_path, models, text_data)
    dry = cli("regmean", "merge", recipe, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "never fired" in dry.output and "model.layers.0.self_attn.q_proj.weight" in dry.output
    assert not (tmp_path / "out").exists()
    result = cli("regmean", "merge", recipe)
    assert result.exit_code == 0, result.output
    assert "never fired" in result.output
    merged = load_dir(tmp_path / "out")
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())
    inputs = [load_dir(m) for m in models]
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name][:, 5], (inputs[0][name][:, 5] + inputs[1][name][:, 5]) / 2)


def test_dry_run_and_validate_write_nothing(tmp_path, llama_recipe):
    out = tmp_path / "out"
    result = cli("regmean", "merge", llama_recipe, "-o", out, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "15 tensors RegMean" in result.output and "peak memory" in result.output
    assert not out.exists()
    result = cli("validate", llama_recipe, "-o", out)
    assert result.exit_code == 0, result.output
    assert "valid regmean recipe" in result.output and not out.exists()


# ---------------------------------------------------------------------------------------------
# Bad statistics: one clear message, no output


def copy_recipe(tmp_path: Path, recipe: Path) -> Path:
    """The recipe and its statistics, copied so that a test can damage them."""
    shutil.copytree(recipe.parent / "stats", tmp_path / "stats")
    shutil.copyfile(recipe, tmp_path / "recipe.toml")
    return tmp_path / "recipe.toml"


def assert_fails(tmp_path: Path, recipe: Path, code: int, *words: str, command=("regmean", "merge")) -> None:
    options = ["-o", tmp_path / "out"] if command[-1] != "collect-stats" else []
    result = cli(*command, recipe, *options)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, result.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("other", ["same architecture", "other architecture"])
def test_stats_of_another_model_are_refused(tmp_path, llama_recipe, llama_models, other):
    recipe = copy_recipe(tmp_path, llama_recipe)
    if other == "same architecture":  # a fine-tune: same fingerprint, other weights
        replacements = [perturbed_copy(m, tmp_path / f"other-{i}", seed=i) for i, m in enumerate(llama_models)]
    else:
        replacements = [build_llama(tmp_path / f"other-{i}", seed=i, vocab_size=160) for i in range(2)]
    text = recipe.read_text()
    for model, replacement in zip(llama_models, replacements):
        text = text.replace(f'"{model}"', f'"{replacement}"')
    recipe.write_text(text)
    assert_fails(tmp_path, recipe, 1, "models.0 (m0)", "models.1 (m1)", "another model")


@pytest.mark.parametrize("version", [0, 1, 2])
def test_stats_of_an_older_format_version_are_refused(tmp_path, llama_recipe, version):
    recipe = copy_recipe(tmp_path, llama_recipe)
    index = tmp_path / "stats" / "m1" / "stats.json"
    meta = json.loads(index.read_text())
    meta["format_version"] = version
    index.write_text(json.dumps(meta))
    assert_fails(tmp_path, recipe, 1, f"format version {version}", "this mergecli reads version 3",
                 "collect them again", "mergecli regmean collect-stats RECIPE", "--force")


@pytest.mark.parametrize("damage", ["truncate", "json", "missing"])
def test_corrupt_or_missing_stats_are_refused(tmp_path, llama_recipe, damage):
    recipe = copy_recipe(tmp_path, llama_recipe)
    directory = tmp_path / "stats" / "m0"
    if damage == "truncate":
        grams = directory / "grams-00001.safetensors"
        grams.write_bytes(grams.read_bytes()[:-100])
        words = ["truncated"]
    elif damage == "json":
        (directory / "stats.json").write_text('{"format": "mergecli-regmean-stats", "format_')
        words = ["corrupt"]
    else:
        shutil.rmtree(directory)
        words = ["no RegMean statistics", "collect-stats"]
    assert_fails(tmp_path, recipe, 1, "models.0 (m0)", *words)
    if damage != "missing":
        assert_fails(tmp_path, recipe, 1, *words, command=("validate",))


def test_validate_before_collect_stats_checks_everything_and_notes_what_to_collect(tmp_path, llama_recipe):
    """validate → collect-stats → merge: before any statistics exist, validate passes and says which
    statistics are still to be collected (and a RegMean plan counts the linear layers)."""
    recipe = copy_recipe(tmp_path, llama_recipe)
    shutil.rmtree(tmp_path / "stats")
    result = cli("validate", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "statistics still to be collected for m0, m1" in result.stderr
    assert "15 tensors RegMean" in result.stdout
    broken = recipe.read_text().replace(".jsonl", ".missing.jsonl")
    recipe.write_text(broken)
    assert_fails(tmp_path, recipe, 2, "calibration data", "does not exist", command=("validate",))


def first_gram_offset(path: Path) -> int:
    """Where the first Gram's data starts in a statistics file (read from its header here)."""
    length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + length])
    first = min((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    return 8 + length + first[0]


def resealed(directory: Path, gram_file: str) -> None:
    """Make stats.json agree with a damaged Gram file again (its sha256, then its own checksum), computed
    here independently: what a corruption that keeps every checksum consistent looks like."""
    path = directory / gram_file
    length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + length])
    meta = json.loads((directory / "stats.json").read_text())
    for key, entry in header.items():
        if key != "__metadata__":
            begin, end = entry["data_offsets"]
            meta["grams"][key]["sha256"] = hashlib.sha256(path.read_bytes()[8 + length + begin:8 + length + end]
                                                           ).hexdigest()
    body = {k: v for k, v in meta.items() if k != "checksum"}
    meta["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (directory / "stats.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", ["off-diagonal nan", "off-diagonal inf, resealed", "zeroed", "copied",
                                    "linked", "tokens x1000", "dead features"])
def test_corrupt_statistics_are_never_merged(tmp_path, llama_recipe, damage):
    """Each corruption that a fault-injection run merged without a word now fails, naming the file."""
    recipe = copy_recipe(tmp_path, llama_recipe)
    directory = tmp_path / "stats" / "m1"
    grams = directory / "grams-00001.safetensors"
    meta = json.loads((directory / "stats.json").read_text())
    named = str(grams)
    if damage.startswith("off-diagonal"):
        data = bytearray(grams.read_bytes())
        value = float("nan") if "nan" in damage else float("inf")
        offset = first_gram_offset(grams) + 8  # row 0, column 1 of the first Gram's upper triangle
        data[offset:offset + 8] = struct.pack("<d", value)
        grams.write_bytes(bytes(data))
        if "resealed" in damage:
            resealed(directory, grams.name)
    elif damage == "zeroed":
        data = bytearray(grams.read_bytes())
        start = first_gram_offset(grams)
        data[start:] = bytes(len(data) - start)
        grams.write_bytes(bytes(data))
    elif damage in ("copied", "linked"):
        other = tmp_path / "stats" / "m0" / "grams-00001.safetensors"
        grams.unlink()
        shutil.copyfile(other, grams) if damage == "copied" else grams.symlink_to(other)
    elif damage == "tokens x1000":
        for entry in meta["grams"].values():
            entry["tokens"] *= 1000
        for entry in meta["layers"].values():
            entry["tokens"] *= 1000
        (directory / "stats.json").write_text(json.dumps(meta))
        named = str(directory / "stats.json")
    else:
        next(iter(meta["grams"].values()))["dead_features"] = [0, 1, 2]
        (directory / "stats.json").write_text(json.dumps(meta))
        named = str(directory / "stats.json")
    assert_fails(tmp_path, recipe, 1, named, "corrupt" if damage != "copied" and damage != "linked" else "not one of")


@pytest.mark.parametrize("change", ["num_examples", "data"])
def test_a_merge_with_other_data_settings_than_the_statistics_is_refused(tmp_path, llama_recipe, change):
    """The output's mergecli.toml would record data the statistics did not come from: refused, with both
    digests (or values) and the two ways out."""
    recipe = copy_recipe(tmp_path, llama_recipe)
    if change == "num_examples":
        args, words = ["--set", "regmean.num_examples=3"], ["num_examples 16 → 3"]
    else:
        text = recipe.read_text()
        data = Path(re.search(r'data = "([^"]+)"', text).group(1))
        copy = tmp_path / ("other" + data.suffix)
        copy.write_text(data.read_text().replace("the", "a"))
        recipe.write_text(text.replace(str(data), str(copy)))
        old = json.loads((tmp_path / "stats" / "m0" / "stats.json").read_text())["data"]["sha256"]
        args, words = [], [f"sha256 {old[:12]}… → "]
    result = cli("regmean", "merge", recipe, "-o", tmp_path / "out", *args)
    assert result.exit_code == 1, result.output
    for word in [*words, "collected from other data than the recipe's", "collect them again",
                 "set the recipe's data settings to those"]:
        assert word in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_average_recipe_is_refused(tmp_path, llama_models):
    recipe = tmp_path / "avg.toml"
    recipe.write_text(f'[[models]]\npath = "{llama_models[0]}"\n[[models]]\npath = "{llama_models[1]}"\n')
    assert_fails(tmp_path, recipe, 2, "method is 'average'")
    assert_fails(tmp_path, recipe, 2, "method is 'average'", command=("regmean", "collect-stats"))
