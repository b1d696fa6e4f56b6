"""LoRA adapters as inputs: each made by PEFT itself on a tiny real LLaMA (plain LoRA, rsLoRA with a
rank and an alpha pattern, DoRA, modules_to_save, an embedding target), applied as its base's tensors are
read. Every merge over adapter inputs equals the float64 merge of PEFT's own `merge_and_unload()` models
(computed here from them), within one unit of the float32 output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_method_formulas import CASES, units_off

from builders import build_llama
from clirunner import cli, merge_recipe

ADAPTERS = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora-patterns": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj"],
                        "rank_pattern": {"up_proj": 2}, "alpha_pattern": {"o_proj": 4}},
    "dora-modules-to-save": {"r": 4, "lora_alpha": 4, "use_dora": True, "target_modules": ["k_proj", "gate_proj"],
                             "modules_to_save": ["lm_head"]},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
}


def make_adapter(base: Path, path: Path, settings: dict, seed: int) -> dict[str, torch.Tensor]:
    """A PEFT adapter of `base` with random factors (B is zero at init: a real fine-tune's is not), saved to
    `path`; returns PEFT's own merge_and_unload() of it, in float64."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**settings))
    for name, parameter in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            parameter.data.normal_(0, 0.05 if "magnitude" not in name else 1.0)
            if "magnitude" in name:
                parameter.data.abs_()
    model.save_pretrained(path)
    merged = model.merge_and_unload()
    return {name: value.detach().double() for name, value in merged.state_dict().items()}


@pytest.fixture(scope="session")
def adapters(models_dir) -> dict:
    base = build_llama(models_dir / "lora-base", seed=60)
    found = {"base": base}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        path = models_dir / f"adapter-{name}"
        found[name] = (path, make_adapter(base, path, settings, seed=61 + i))
    return found


def run(directory: Path, method: str, models: list[Path], **options) -> dict[str, torch.Tensor]:
    return load_file(merge_recipe(directory, method, models, **options) / "model.safetensors")


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_an_adapter_input_is_its_base_with_the_adapter_merged_as_peft_merges_it(adapters, tmp_path, name):
    path, merged = adapters[name]
    got = run(tmp_path, "average", [path])
    assert set(got) == set(merged)
    for tensor, value in merged.items():
        assert int(units_off(got[tensor], value).max()) <= 1, tensor


def test_average_and_ties_over_adapters_are_their_formulas_over_peft_merged_models(adapters, tmp_path):
    names = ["lora", "rslora-patterns", "dora-modules-to-save"]
    got = run(tmp_path / "avg", "average", [adapters[n][0] for n in names], weights=[0.2, 0.3, 0.5])
    for tensor in got:
        want = sum(w * adapters[n][1][tensor] for w, n in zip((0.2, 0.3, 0.5), names))
        assert int(units_off(got[tensor], want).max()) <= 1, tensor
    table, _, _, _, reference = CASES["ties"]
    base = {k: v.double() for k, v in load_file(adapters["base"] / "model.safetensors").items()}
    got = run(tmp_path / "ties", "ties", [adapters[n][0] for n in names], base=adapters["base"], table=table,
              weights=[1.0, 0.5, 2.0])
    for tensor, value in base.items():
        want = reference(value, [adapters[n][1][tensor] for n in names], tensor, [1.0, 0.5, 2.0])
        assert int(units_off(got[tensor], want).max()) <= 1, tensor


def test_regmean_over_adapters_is_regmean_over_their_merged_models(adapters, tmp_path):
    """RegMean's statistics run through the adapted weights: the same Grams and merge as over PEFT's merged
    models written out (within float32's rounding of the solve)."""
    from safetensors.torch import save_file

    (tmp_path / "data.txt").write_text("the model merge weight layer token data\nthe a of to and in is\n" * 6)
    names = ["lora", "dora-modules-to-save"]
    copies = []
    for name in names:
        copy = tmp_path / f"merged-{name}"
        copy.mkdir()
        for file in adapters["base"].iterdir():
            if file.suffix != ".safetensors":
                (copy / file.name).write_bytes(file.read_bytes())
        save_file({k: v.float().contiguous() for k, v in adapters[name][1].items()}, copy / "model.safetensors",
                  metadata={"format": "pt"})
        copies.append(copy)

    def regmean(label: str, paths: list[Path]) -> dict[str, torch.Tensor]:
        lines = ['method = "regmean"', f'output = "out-{label}"', 'dtype = "float32"']
        for path, model in zip(paths, ("a", "b")):
            lines += ["[[models]]", f'path = "{path}"', f'name = "{model}"', 'data = "data.txt"']
        lines += ["[regmean]", f'stats_dir = "stats-{label}"', "num_examples = 8", "batch_size = 4",
                  "max_length = 12"]
        (tmp_path / f"{label}.toml").write_text("\n".join(lines) + "\n")
        assert cli("regmean", "collect-stats", tmp_path / f"{label}.toml").exit_code == 0
        result = cli("regmean", "merge", tmp_path / f"{label}.toml")
        assert result.exit_code == 0, result.output
        return load_file(tmp_path / f"out-{label}" / "model.safetensors")

    got, want = regmean("adapters", [adapters[n][0] for n in names]), regmean("merged", copies)
    for tensor in want:
        scale = float(want[tensor].abs().max())
        assert torch.allclose(got[tensor], want[tensor], rtol=0, atol=scale * 2**-20), tensor


# ---------------------------------------------------------------------------------------------
# Bad input, one line


def refused(result, words: str) -> None:
    assert result.exit_code == 1, result.output
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith("error: ") and words in first, result.stderr


def copy_adapter(path: Path, target: Path, **changes) -> Path:
    target.mkdir()
    for file in path.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(changes)
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_an_adapter_without_its_base_is_refused(adapters, tmp_path):
    lost = copy_adapter(adapters["lora"][0], tmp_path / "lost", base_model_name_or_path="/nowhere/llama")
    refused(cli("average", "-m", lost, "-o", tmp_path / "out"), "is a LoRA adapter, and its base was not found")
    assert not (tmp_path / "out").exists()


def test_an_adapter_over_a_base_of_other_shapes_is_refused(adapters, models_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from builders import llama_config

    other = tmp_path / "wide"
    LlamaForCausalLM(llama_config(hidden=64)).save_pretrained(other)
    (tmp_path / "r.toml").write_text(f'output = "out"\n[[models]]\npath = "{adapters["lora"][0]}"\nbase = "{other}"\n')
    refused(cli("average", tmp_path / "r.toml"), "does not fit its base's")


def test_an_adapter_of_another_peft_type_is_refused_by_name(adapters, tmp_path):
    ia3 = copy_adapter(adapters["lora"][0], tmp_path / "ia3", peft_type="IA3")
    refused(cli("average", "-m", ia3, "-o", tmp_path / "out"), "is a IA3 adapter; mergecli applies LoRA adapters")


def test_the_entry_base_names_the_base_where_the_adapter_config_does_not(adapters, tmp_path):
    lost = copy_adapter(adapters["lora"][0], tmp_path / "lost", base_model_name_or_path="/nowhere/llama")
    (tmp_path / "r.toml").write_text(f'output = "out"\ndtype = "float32"\n[[models]]\npath = "{lost}"\n'
                                     f'base = "{adapters["base"]}"\n')
    assert cli("average", tmp_path / "r.toml").exit_code == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(int(units_off(got[k], v).max()) <= 1 for k, v in adapters["lora"][1].items())


# ---------------------------------------------------------------------------------------------
# Adapters written: extract-lora, and a merge with output_format = "lora"


def fine_tune_dir(adapters, tmp_path: Path, name: str, *, norm_shift: float = 0.0) -> Path:
    """PEFT's merge_and_unload() of an adapter, saved as a full model (a norm shifted, to differ whole)."""
    from safetensors.torch import save_file

    folder = tmp_path / f"full-{name}"
    folder.mkdir()
    for file in adapters["base"].iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    tensors = {k: v.float().contiguous() for k, v in adapters[name][1].items()}
    tensors["model.layers.1.input_layernorm.weight"] += norm_shift
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def peft_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter loaded by PEFT onto its base, merged by PEFT: what a user gets."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()}


def test_extract_lora_loads_with_peft_and_is_the_truncated_svd_of_each_difference(adapters, tmp_path):
    model = fine_tune_dir(adapters, tmp_path, "rslora-patterns", norm_shift=0.25)
    result = cli("extract-lora", model, "--base", adapters["base"], "--rank", "3", "-o", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.layers.1.input_layernorm"]  # a norm differs: saved whole
    assert config["base_model_name_or_path"] == "lora-base"  # a local base by its folder's name, no path
    loaded = peft_weights(adapters["base"], tmp_path / "adapter")
    base = {k: v.double() for k, v in load_file(adapters["base"] / "model.safetensors").items()}
    tuned = {k: v.double() for k, v in load_file(model / "model.safetensors").items()}
    for name, value in base.items():
        delta = tuned[name] - value
        want = value + (truncated(delta, 3) if value.dim() == 2 and delta.any() else delta)
        assert torch.linalg.norm(loaded[name] - want) <= 1e-4 * max(float(torch.linalg.norm(want - value)), 1e-12) \
            + 1e-6, name
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "relative error" in card and "base_model: lora-base" in card


def test_extract_lora_by_error_keeps_the_least_rank_within_it(adapters, tmp_path):
    model = fine_tune_dir(adapters, tmp_path, "lora")
    result = cli("extract-lora", model, "--base", adapters["base"], "--error", "0.3", "-o", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base = {k: v.double() for k, v in load_file(adapters["base"] / "model.safetensors").items()}
    tuned = {k: v.double() for k, v in load_file(model / "model.safetensors").items()}
    for name, error in report["errors"].items():
        delta = tuned[name] - base[name]
        s = torch.linalg.svdvals(delta)
        after = [float(s[r:].square().sum().sqrt() / s.square().sum().sqrt()) for r in range(len(s) + 1)]
        rank = report["ranks"][name.removesuffix(".weight")]
        assert after[rank] <= 0.3 and (rank == 0 or after[rank - 1] > 0.3), (name, rank, after[:6])
        assert abs(error - after[rank]) <= 1e-6, name


def test_a_merge_of_adapters_written_as_an_adapter(adapters, tmp_path):
    names = ["lora", "rslora-patterns"]
    lines = ['method = "average"', 'output = "out"', 'output_format = "lora"', "lora_rank = 12", "[base]",
             f'path = "{adapters["base"]}"']
    for name in names:
        lines += ["[[models]]", f'path = "{adapters[name][0]}"']
    (tmp_path / "r.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", tmp_path / "r.toml")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out" / "config.json").exists() and "PeftModel.from_pretrained" in result.output
    loaded = peft_weights(adapters["base"], tmp_path / "out")
    base = {k: v.double() for k, v in load_file(adapters["base"] / "model.safetensors").items()}
    for name in base:  # both adapters' ranks (4 + 8 at most) fit in 12: the merge itself
        want = sum(adapters[n][1][name] for n in names) / 2
        assert torch.allclose(loaded[name], want, rtol=0, atol=1e-6), name


def test_a_rank_larger_than_a_tensor_is_refused(adapters, tmp_path):
    model = fine_tune_dir(adapters, tmp_path, "lora")
    result = cli("extract-lora", model, "--base", adapters["base"], "--rank", "1000", "-o", tmp_path / "a")
    assert result.exit_code == 2, result.output
    assert "rank 1000 is larger than" in result.stderr and not (tmp_path / "a").exists()


def test_a_gpt2_adapter_on_its_fused_conv1d_attention_is_applied_transposed(models_dir, tmp_path):
    """GPT-2 stores c_attn as a Conv1D [in, 3·out]: PEFT's fan_in_fan_out adds (B·A)ᵀ."""
    from builders import build_gpt2

    base = build_gpt2(tmp_path / "gpt2", seed=70)
    merged = make_adapter(base, tmp_path / "gpt2-adapter", {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True,
                                                            "target_modules": ["c_attn", "c_fc"]}, seed=71)
    lines = ['method = "average"', f'output = "{tmp_path / "out"}"', 'dtype = "float32"', "[[models]]",
             f'path = "{tmp_path / "gpt2-adapter"}"', f'base = "{base}"']
    (tmp_path / "r.toml").write_text("\n".join(lines) + "\n")
    result = cli("merge", tmp_path / "r.toml")
    assert result.exit_code == 0, result.output
    got = load_file(tmp_path / "out" / "model.safetensors")
    changed = 0
    for name, value in got.items():
        want = merged.get(name, merged.get(f"transformer.{name}"))
        assert int(units_off(value, want).max()) <= 1, name
        changed += "c_attn.weight" in name
    assert changed == 2
