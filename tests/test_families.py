"""RegMean and RegMean++ across transformers families, each a tiny model saved by the installed
transformers with `save_pretrained`: collect-stats, merge and RegMean++, and the output loads back.
GPT-NeoX (whose file names its head `embed_out`) and the T5 encoder (whose blocks hand a position bias
on) are checked against float64 least squares per linear layer; the image encoders ViT and SigLIP
vision are calibrated on images. MoE checkpoints (Mixtral, Qwen3-MoE), whose experts the file stores
apart and the class holds fused: each expert's projections are least-squares fits over the tokens
routed to it (routing recomputed here from the file's router), and an expert that saw too few tokens
is averaged and named in the plan and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from builders import word_tokenizer
from clirunner import cli
from references import (
    layer_inputs,
    module_inputs,
    random_texts,
    text_inputs,
    write_images,
    write_txt,
)

SMALL = {"vocab_size": 128, "max_position_embeddings": 128}
DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2}
FAMILIES = {  # model_type → (class, config keys)
    "llama": ("LlamaForCausalLM", DECODER),
    "mistral": ("MistralForCausalLM", DECODER),
    "gemma2": ("Gemma2ForCausalLM", {**DECODER, "head_dim": 8}),
    "gemma3_text": ("Gemma3ForCausalLM", {**DECODER, "head_dim": 8}),
    "olmo2": ("Olmo2ForCausalLM", DECODER),
    "qwen3": ("Qwen3ForCausalLM", {**DECODER, "head_dim": 8}),
    "phi3": ("Phi3ForCausalLM", {**DECODER, "pad_token_id": 0}),
    "opt": ("OPTForCausalLM", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "word_embed_proj_dim": 32}),
    "gpt_neox": ("GPTNeoXForCausalLM", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                        "num_attention_heads": 4}),
    "roberta": ("RobertaModel", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "max_position_embeddings": 160}),
    "t5": ("T5EncoderModel", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}),
}
MOE = {
    "mixtral": ("MixtralForCausalLM", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {**DECODER, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
                                          "moe_intermediate_size": 64, "decoder_sparse_step": 1}),
}
TEXTS = ["the model merge weight layer token data", "the a of to and in is it that", "math code text image train",
         "test loss mean sum one all", "model data token weight merge layer"] * 4


def build(path: Path, kind: str, spec: tuple[str, dict], seed: int, dtype=torch.float32) -> Path:
    class_name, keys = spec
    config = transformers.AutoConfig.for_model(kind, **{**SMALL, **keys})
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).to(dtype)
    with torch.no_grad():  # norms that look trained, so that no Gram is singular
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() and parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    model.save_pretrained(path)
    word_tokenizer(128).save_pretrained(path)
    return path


def regmean_recipe(tmp_path: Path, models: list[Path], data: Path, examples: int = 20) -> Path:
    lines = ['method = "regmean"', 'output = "out"']
    for model in models:
        lines += ["[[models]]", f'path = "{model}"', f'data = "{data}"']
    lines += ["[regmean]", 'stats_dir = "stats"', f"num_examples = {examples}", "batch_size = 5", "max_length = 16",
              "reduce_non_diagonal_ratio = 1.0"]
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_family_collects_merges_and_loads_back(kind, tmp_path):
    models = [build(tmp_path / f"{kind}-{i}", kind, FAMILIES[kind], seed=i) for i in range(2)]
    recipe = regmean_recipe(tmp_path, models, write_txt(tmp_path / "data.txt", TEXTS))
    assert cli("validate", recipe).exit_code == 0
    for command in (("regmean", "collect-stats", recipe), ("regmean", "merge", recipe),
                    ("regmean", "merge", recipe, "--set", "regmean.sequential=true", "-o", tmp_path / "pp")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
    for out in (tmp_path / "out", tmp_path / "pp"):
        model = getattr(transformers, FAMILIES[kind][0]).from_pretrained(out)
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([[4, 5, 6, 7]]))[0]
        assert torch.isfinite(hidden).all()


ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "image_size": 32, "patch_size": 8}
IMAGE_FAMILIES = {  # model_type → (class, config class, image processor)
    "vit": ("ViTModel", "ViTConfig", "ViTImageProcessor"),
    "siglip_vision_model": ("SiglipVisionModel", "SiglipVisionConfig", "SiglipImageProcessor"),
}


@pytest.mark.parametrize("kind", list(IMAGE_FAMILIES))
def test_image_encoder_family_collects_merges_and_loads_back(kind, tmp_path):
    class_name, config_name, processor_name = IMAGE_FAMILIES[kind]
    models = []
    for seed in range(2):
        path = tmp_path / f"{kind}-{seed}"
        torch.manual_seed(seed)
        model = getattr(transformers, class_name)(getattr(transformers, config_name)(**ENCODER))
        with torch.no_grad():  # LayerNorms that look trained, so that no Gram is singular
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        model.save_pretrained(path)
        getattr(transformers, processor_name)(size={"height": 32, "width": 32}).save_pretrained(path)
        models.append(path)
    images = write_images(tmp_path / "images", 6, seed=0)
    recipe = regmean_recipe(tmp_path, models, images, examples=6)
    assert cli("validate", recipe).exit_code == 0
    for command in (("regmean", "collect-stats", recipe), ("regmean", "merge", recipe),
                    ("regmean", "merge", recipe, "--set", "regmean.sequential=true", "-o", tmp_path / "pp")):
        result = cli(*command)
        assert result.exit_code == 0, result.output
    originals = [load_file(path / "model.safetensors") for path in models]
    for out in ("out", "pp"):
        merged = load_file(tmp_path / out / "model.safetensors")
        query = next(name for name in merged if name.endswith(("query.weight", "q_proj.weight")))
        assert not torch.allclose(merged[query], (originals[0][query] + originals[1][query]) / 2)  # solved
        if kind == "siglip_vision_model":  # the pooling head's MultiheadAttention reads out_proj without calling it
            name = "head.attention.out_proj.weight"
            torch.testing.assert_close(merged[name], (originals[0][name] + originals[1][name]) / 2)
    if kind == "siglip_vision_model":
        assert "head.attention.out_proj.weight: its layer never ran on the calibration data; it is averaged" \
            in result.output
    for out in (tmp_path / "out", tmp_path / "pp"):
        model = getattr(transformers, class_name).from_pretrained(out)
        with torch.no_grad():
            hidden = model(pixel_values=torch.randn(1, 3, 32, 32))[0]
        assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("kind", ["gpt_neox", "t5"])
def test_linear_layers_are_least_squares_fits(kind, tmp_path):
    models = [build(tmp_path / f"{kind}-{i}", kind, FAMILIES[kind], seed=10 + i, dtype=torch.float64)
              for i in range(2)]
    texts = random_texts(7, 40, shortest=8, longest=16)  # distinct tokens enough for full-rank Grams
    data = write_txt(tmp_path / "data.txt", texts)
    recipe = regmean_recipe(tmp_path, models, data, examples=40)
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    result = cli("regmean", "merge", recipe)
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    inputs = [load_file(m / "model.safetensors") for m in models]
    xs = [layer_inputs(m, text_inputs(m, texts, max_length=16)) for m in models]
    stored = {"lm_head": "embed_out"}  # GPT-NeoX's file names its head by its legacy name
    checked = 0
    for module in xs[0]:
        name = f"{stored.get(module, module)}.weight"
        if name not in merged:
            continue
        a = torch.cat([(1 / x[module].shape[0]) ** 0.5 * x[module] for x in xs])
        b = torch.cat([(1 / x[module].shape[0]) ** 0.5 * x[module] @ w[name].double().T for x, w in zip(xs, inputs)])
        expected = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
        error = torch.linalg.norm(merged[name].double() - expected) / torch.linalg.norm(expected)
        assert error < 1e-8, f"{name}: relative error {float(error):.2e}"
        checked += 1
    assert checked >= 2 * 4 + (1 if kind == "gpt_neox" else 0)


@pytest.mark.parametrize("kind", list(MOE))
def test_moe_family_collects_merges_and_averages_experts_short_of_tokens(kind, tmp_path):
    models = [build(tmp_path / f"{kind}-{i}", kind, MOE[kind], seed=i) for i in range(2)]
    recipe = regmean_recipe(tmp_path, models, write_txt(tmp_path / "data.txt", TEXTS))
    before = cli("validate", recipe)  # before any data is read: the experts' Grams a block will hold
    hidden, inner = 32, 64  # 4 experts; gate/up read the hidden states, down the gated product
    grams = 4 * (hidden * (hidden + 1) // 2 + inner * (inner + 1) // 2) * 12  # float64 sums, float32 staging
    assert before.exit_code == 0 and "24 MoE expert weights are planned as merged by RegMean" in before.output
    assert f"Their Grams take {grams / 1e6:.1f} MB a block while they are collected" in before.output
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    planned = cli("validate", recipe)
    outputs = {"out": cli("regmean", "merge", recipe),
               "pp": cli("regmean", "merge", recipe, "--set", "regmean.sequential=true", "-o", tmp_path / "pp")}
    originals = [load_file(path / "model.safetensors") for path in models]
    stats = [json.loads((tmp_path / "stats" / path.name / "stats.json").read_text())["layers"] for path in models]
    for out, result in outputs.items():
        assert result.exit_code == 0, result.output
        merged = load_file(tmp_path / out / "model.safetensors")
        experts = [name for name in merged if ".experts." in name]
        averaged = {name for name in experts
                    if torch.equal(merged[name], (originals[0][name] + originals[1][name]) / 2)}
        if out == "out":  # 100 tokens over 4 experts, top 2: some experts see fewer than they have inputs
            few = {name for name in experts if any(s[name]["tokens"] < s[name]["in_features"] for s in stats)}
            assert few and averaged == few
            assert f"{len(few)} tensors averaged (MoE experts with fewer calibration tokens than inputs)" \
                in planned.output
        else:  # RegMean++ decides as it runs, and says so once for all
            assert result.output.count(f"regmean++: expert weight(s) saw fewer calibration tokens than they have "
                                       f"inputs in some model, and {len(averaged)} are averaged") == 1
        assert f"{len(averaged)} tensors averaged (MoE experts with fewer calibration tokens than inputs)" \
            in (tmp_path / out / "README.md").read_text()
        assert len(averaged) < len(experts)  # the others are solved
        router = next(name for name in merged if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")))
        assert not torch.allclose(merged[router], (originals[0][router] + originals[1][router]) / 2)
        model = getattr(transformers, MOE[kind][0]).from_pretrained(tmp_path / out)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[4, 5, 6, 7]]))[0]).all()


def test_moe_experts_are_least_squares_fits_of_their_routed_tokens(tmp_path):
    kind = "mixtral"
    models = [build(tmp_path / f"{kind}-{i}", kind, MOE[kind], seed=10 + i, dtype=torch.float64) for i in range(2)]
    texts = random_texts(7, 60, shortest=8, longest=16)
    recipe = regmean_recipe(tmp_path, models, write_txt(tmp_path / "data.txt", texts), examples=60)
    assert cli("regmean", "collect-stats", recipe).exit_code == 0
    result = cli("regmean", "merge", recipe)
    assert result.exit_code == 0, result.output
    merged = load_file(tmp_path / "out" / "model.safetensors")
    files = [load_file(m / "model.safetensors") for m in models]
    blocks = [f"model.layers.{layer}.mlp" for layer in range(DECODER["num_hidden_layers"])]
    references = [transformers.MixtralForCausalLM.from_pretrained(m, dtype="auto", experts_implementation="eager")
                  for m in models]  # float64: the grouped matmul has no float64 kernel
    xs = [module_inputs(r.eval(), blocks, text_inputs(m, texts, max_length=16)) for r, m in zip(references, models)]
    checked = 0
    for layer, block in enumerate(blocks):
        stored = f"model.layers.{layer}.block_sparse_moe"
        inputs: dict[str, list[torch.Tensor]] = {f"{stored}.gate.weight": [x[block] for x in xs]}
        for x, w in zip(xs, files):  # the routing, recomputed from the file's router: softmax, top 2
            top = torch.topk(torch.softmax(x[block] @ w[f"{stored}.gate.weight"].T, dim=-1), 2).indices
            for expert in range(4):
                rows = x[block][(top == expert).any(dim=-1)]
                prefix = f"{stored}.experts.{expert}"
                gate, up = rows @ w[f"{prefix}.w1.weight"].T, rows @ w[f"{prefix}.w3.weight"].T
                gated = torch.nn.functional.silu(gate) * up
                for name, value in ((f"{prefix}.w1.weight", rows), (f"{prefix}.w3.weight", rows),
                                    (f"{prefix}.w2.weight", gated)):
                    inputs.setdefault(name, []).append(value)
        for name, rows in inputs.items():
            assert all(r.shape[0] >= r.shape[1] for r in rows), f"{name}: too few tokens for a fit"
            a = torch.cat([(1 / r.shape[0]) ** 0.5 * r for r in rows])
            b = torch.cat([(1 / r.shape[0]) ** 0.5 * r @ w[name].T for r, w in zip(rows, files)])
            expected = torch.linalg.lstsq(a, b, driver="gelsd").solution.T
            error = torch.linalg.norm(merged[name] - expected) / torch.linalg.norm(expected)
            assert error < 1e-8, f"{name}: relative error {float(error):.2e}"
            checked += 1
    assert checked == 2 * (1 + 4 * 3)


def test_experts_stored_fused_are_refused_by_validate_with_the_reason(tmp_path):
    spec = ("GptOssForCausalLM", {**DECODER, "head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2})
    models = [build(tmp_path / f"gpt_oss-{i}", "gpt_oss", spec, seed=i) for i in range(2)]
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(models[0] / "model.safetensors")  # [E, H, 2I]
    recipe = regmean_recipe(tmp_path, models, write_txt(tmp_path / "data.txt", TEXTS))
    result = cli("validate", recipe)
    assert result.exit_code == 1, result.output
    assert "gpt_oss: the checkpoint stores the experts of model.layers.0.mlp.experts fused" in result.stderr
    assert "RegMean cannot merge such layers yet" in result.stderr and "Traceback" not in result.output
    averaged = cli("average", "-m", models[0], "-m", models[1], "-o", tmp_path / "avg")  # other methods merge it
    assert averaged.exit_code == 0, averaged.output


def test_moe_experts_collected_in_rounds_that_fit_the_memory_budget_add_up_the_same(tmp_path):
    """A memory budget smaller than one expert's Grams: each block runs once per expert, summing that
    expert's Grams alone; the statistics, and RegMean++'s merge, are bit-identical to one round's."""
    models = [build(tmp_path / f"mixtral-{i}", "mixtral", MOE["mixtral"], seed=i) for i in range(2)]
    recipe = regmean_recipe(tmp_path, models, write_txt(tmp_path / "data.txt", TEXTS))
    small = ("--set", "regmean.memory_budget=20KB")  # one expert's two Grams: 4 × (528 + 2080) × 12 B = 31 KB
    for extra, stats, out in (((), "stats", "pp"), (small, "rounds", "pp-rounds")):
        result = cli("regmean", "collect-stats", recipe, "--set", f"regmean.stats_dir={stats}", *extra)
        assert result.exit_code == 0, result.output
        merged = cli("regmean", "merge", recipe, "--set", "regmean.sequential=true", "-o", tmp_path / out, *extra)
        assert merged.exit_code == 0, merged.output
    for model in models:
        files = {name: sorted((tmp_path / name / model.name).glob("*.safetensors")) for name in ("stats", "rounds")}
        assert len(files["rounds"]) == len(files["stats"]) + 2 * 3  # 4 rounds a block, not 1
        grams = {name: {k: v for f in found for k, v in load_file(f).items()} for name, found in files.items()}
        assert grams["rounds"].keys() == grams["stats"].keys()
        assert all(torch.equal(grams["rounds"][k], grams["stats"][k]) for k in grams["stats"])
        meta = {name: json.loads((tmp_path / name / model.name / "stats.json").read_text()) for name in files}
        assert meta["rounds"]["layers"] == meta["stats"]["layers"]
    one, rounds = (load_file(tmp_path / out / "model.safetensors") for out in ("pp", "pp-rounds"))
    assert one.keys() == rounds.keys() and all(torch.equal(one[k], rounds[k]) for k in one)
