"""A corpus of mergekit configs, written in the forms mergekit's README and examples show, run by mergekit
0.1.5 (its own venv: `make mergekit-venv`) and by `mergecli merge config.yml`, on the same tiny models;
every tensor compared. Prints the table the README quotes.

The models: a LLaMA-shaped base (4 layers, hidden 32, float32) and three fine-tunes of it; two chat
fine-tunes that add tokens (for the tokenizer configs). Where the tokenizers differ, embedding and head
rows are compared by the token they stand for, each output read through its own tokenizer.

Verdicts: "bit-identical"; "float32 rounding" (every element within 2 units of the float32 rounding of
the tensor's largest magnitude); "random mask" (DARE: mergekit draws its drop mask from torch's
generator, mergecli from a hash of the seed and the position; the same configs at density 1, where no
entry is dropped, agree); otherwise the largest difference is shown.

Usage: python benchmarks/mergekit_corpus.py [WORKDIR]   (default bench-out/corpus)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_vocabulary import fine_tune  # noqa: E402

from builders import build_llama, llama_config, word_tokenizer  # noqa: E402


def models(work: Path) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    found = {name: work / name for name in ("base", "a", "b", "c", "chatbase", "chat", "tool")}
    if all((path / "model.safetensors").exists() for path in found.values()):
        return found
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(layers=4)).save_pretrained(found["base"])
    word_tokenizer(128).save_pretrained(found["base"])
    weights = load_file(found["base"] / "model.safetensors")
    for seed, name in enumerate("abc", start=1):
        found[name].mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in weights.items()},
                  found[name] / "model.safetensors", metadata={"format": "pt"})
        for file in found["base"].iterdir():
            if file.suffix != ".safetensors":
                (found[name] / file.name).write_bytes(file.read_bytes())
        if name == "c":  # a chat fine-tune: its tokenizer has a chat template
            config = json.loads((found[name] / "tokenizer_config.json").read_text())
            config["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            (found[name] / "tokenizer_config.json").write_text(json.dumps(config))
    build_llama(found["chatbase"], seed=5, vocab_size=62)
    fine_tune(found["chatbase"], found["chat"], ["<|im_start|>", "<|im_end|>"], 6)
    fine_tune(found["chatbase"], found["tool"], ["<|im_start|>", "<tool>"], 7)
    return found


def corpus(m: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(name, the features it shows, the config's text) of each config."""
    base, a, b, c = m["base"], m["a"], m["b"], m["c"]

    def weighted(*pairs: tuple[Path, object]) -> str:
        return "\n".join(f"  - model: {path}\n    parameters:\n      weight: {weight}" for path, weight in pairs)

    def two(x: Path = a, y: Path = b) -> str:
        return f"  - model: {x}\n  - model: {y}"

    slerp_slices = (f"slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n      - model: {b}\n"
                    f"        layer_range: [0, 4]\n")
    return [
        ("linear-2", "weights", f"merge_method: linear\ndtype: float32\nmodels:\n{weighted((a, 0.5), (b, 0.5))}\n"),
        ("linear-3", "weights, normalize", f"merge_method: linear\ndtype: float32\nparameters:\n  normalize: true\n"
                                           f"models:\n{weighted((a, 1), (b, 2), (c, 3))}\n"),
        ("linear-unnormalized", "normalize: false", f"merge_method: linear\ndtype: float32\nparameters:\n"
                                                    f"  normalize: false\nmodels:\n{weighted((a, 0.3), (b, 0.3))}\n"),
        ("linear-base-weighted", "base_model among the models", f"merge_method: linear\nbase_model: {a}\n"
                                                                f"dtype: float32\nmodels:\n"
                                                                f"{weighted((a, 0.3), (b, 0.7))}\n"),
        ("linear-bf16", "out_dtype", f"merge_method: linear\nout_dtype: bfloat16\nmodels:\n"
                                     f"{weighted((a, 1), (b, 1))}\n"),
        ("linear-fp16", "dtype float16", f"merge_method: linear\ndtype: float16\nmodels:\n"
                                         f"{weighted((a, 1), (b, 3))}\n"),
        ("linear-gradient", "per-model gradient", f"merge_method: linear\ndtype: float32\nmodels:\n"
                                                  f"{weighted((a, [0, 1]), (b, [1, 0]))}\n"),
        ("linear-filter", "filter", f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {a}\n    parameters:\n"
                                    f"      weight:\n        - filter: self_attn\n          value: 0.8\n"
                                    f"        - value: 0.2\n  - model: {b}\n    parameters:\n      weight: 0.5\n"),
        ("ta-lambda", "lambda", f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nparameters:\n"
                                f"  lambda: 0.8\nmodels:\n{weighted((a, 0.6), (b, 0.4))}\n"),
        ("ta-gradient", "per-model gradient", f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                                              f"models:\n{weighted((a, [0.2, 0.8]), (b, [0.8, 0.2]))}\n"),
        ("ta-normalize", "normalize: true", f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                                            f"parameters:\n  normalize: true\nmodels:\n{weighted((a, 1), (b, 3))}\n"),
        ("ta-density", "density (ignored)", f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                                            f"parameters:\n  density: 0.5\nmodels:\n{weighted((a, 1), (b, 1))}\n"),
        ("ties", "density, weights", f"merge_method: ties\nbase_model: {base}\ndtype: float32\nparameters:\n"
                                     f"  density: 0.5\nmodels:\n{weighted((a, 0.7), (b, 0.3))}\n"),
        ("ties-model-density", "per-model density gradient",
         f"merge_method: ties\nbase_model: {base}\ndtype: float32\nmodels:\n  - model: {a}\n    parameters:\n"
         f"      weight: 1\n      density: [0.2, 0.8]\n  - model: {b}\n    parameters:\n      weight: 1\n"
         f"      density: 0.5\n  - model: {c}\n    parameters:\n      weight: 0.5\n      density: 0.9\n"),
        ("ties-unnormalized", "normalize: false", f"merge_method: ties\nbase_model: {base}\ndtype: float32\n"
                                                  f"parameters:\n  density: 0.4\n  normalize: false\nmodels:\n"
                                                  f"{weighted((a, 0.5), (b, 0.5))}\n"),
        ("ties-bf16", "int8_mask, bfloat16", f"merge_method: ties\nbase_model: {base}\ndtype: bfloat16\nparameters:\n"
                                             f"  density: 0.5\n  int8_mask: true\nmodels:\n"
                                             f"{weighted((a, 1), (b, 1))}\n"),
        ("ties-filter-lambda", "filter, lambda", f"merge_method: ties\nbase_model: {base}\ndtype: float32\n"
                                                 f"parameters:\n  lambda: 0.7\n  density:\n    - filter: mlp\n"
                                                 f"      value: 0.3\n    - value: 0.7\nmodels:\n"
                                                 f"{weighted((a, 1), (b, 1))}\n"),
        ("dare-ties-dense", "density 1", f"merge_method: dare_ties\nbase_model: {base}\ndtype: float32\nmodels:\n"
                                         f"{weighted((a, 0.6), (b, 0.4))}\n"),
        ("dare-linear-dense", "density 1", f"merge_method: dare_linear\nbase_model: {base}\ndtype: float32\n"
                                           f"models:\n{weighted((a, 0.6), (b, 0.4))}\n"),
        ("dare-ties", "density 0.5", f"merge_method: dare_ties\nbase_model: {base}\ndtype: float32\nparameters:\n"
                                     f"  density: 0.5\nmodels:\n{weighted((a, 0.6), (b, 0.4))}\n"),
        ("dare-linear", "density 0.3", f"merge_method: dare_linear\nbase_model: {base}\ndtype: float32\nparameters:\n"
                                       f"  density: 0.3\nmodels:\n{weighted((a, 0.6), (b, 0.4))}\n"),
        ("slerp", "t", f"merge_method: slerp\nbase_model: {a}\ndtype: float32\nparameters:\n  t: 0.5\n"
                       f"models:\n{two()}\n"),
        ("slerp-gradient", "gradient", f"merge_method: slerp\nbase_model: {a}\ndtype: float32\nparameters:\n"
                                       f"  t: [0, 0.5, 0.3, 0.7, 1]\nmodels:\n{two()}\n"),
        ("slerp-classic", "slices, filters (mergekit's README)",
         f"{slerp_slices}merge_method: slerp\nbase_model: {a}\ndtype: float32\nparameters:\n  t:\n"
         f"    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
         f"      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"),
        ("slerp-bf16", "bfloat16", f"merge_method: slerp\nbase_model: {b}\ndtype: bfloat16\nparameters:\n  t: 0.3\n"
                                   f"models:\n{two()}\n"),
        ("frankenmerge", "passthrough, slices", f"merge_method: passthrough\ndtype: float32\nslices:\n"
                                                f"  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n"
                                                f"  - sources:\n      - model: {b}\n        layer_range: [1, 4]\n"),
        ("depth-upscaling", "passthrough, one model", f"merge_method: passthrough\ndtype: float32\nslices:\n"
                                                      f"  - sources: [{{model: {a}, layer_range: [0, 3]}}]\n"
                                                      f"  - sources: [{{model: {a}, layer_range: [1, 4]}}]\n"),
        ("repeated-layers", "passthrough, overlaps", f"merge_method: passthrough\ndtype: float32\nslices:\n"
                                                     f"  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
                                                     f"  - sources: [{{model: {a}, layer_range: [1, 3]}}]\n"
                                                     f"  - sources: [{{model: {a}, layer_range: [2, 4]}}]\n"),
        ("passthrough-scale", "scale filter", f"merge_method: passthrough\ndtype: float32\nslices:\n"
                                              f"  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n"
                                              f"        parameters:\n          scale:\n"
                                              f"            - filter: o_proj\n              value: 0.5\n"
                                              f"            - value: 1.0\n"),
        ("modules", "modules: {default: {slices}}", f"merge_method: slerp\nbase_model: {a}\ndtype: float32\n"
                                                    f"parameters:\n  t: 0.4\nmodules:\n  default:\n    slices:\n"
                                                    f"      - sources:\n          - model: {a}\n"
                                                    f"            layer_range: [0, 4]\n          - model: {b}\n"
                                                    f"            layer_range: [0, 4]\n"),
        ("ties-slices", "slices with the base", f"merge_method: ties\nbase_model: {base}\ndtype: float32\n"
                                                f"parameters:\n  density: 0.5\nslices:\n  - sources:\n"
                                                f"      - model: {base}\n        layer_range: [0, 4]\n"
                                                f"      - model: {a}\n        layer_range: [0, 4]\n"
                                                f"        parameters: {{weight: 0.7}}\n      - model: {b}\n"
                                                f"        layer_range: [0, 4]\n        parameters: {{weight: 0.3}}\n"),
        ("union", "tokenizer_source: union", f"merge_method: linear\ndtype: float32\ntokenizer_source: union\n"
                                             f"models:\n{weighted((m['chat'], 1), (m['tool'], 1))}\n"),
        ("tokenizer-base", "tokenizer_source: base", f"merge_method: task_arithmetic\nbase_model: {m['chatbase']}\n"
                                                     f"dtype: float32\ntokenizer_source: base\nmodels:\n"
                                                     f"{weighted((m['chat'], 0.5), (m['tool'], 0.5))}\n"),
        ("tokenizer-model", "tokenizer_source: a model", f"merge_method: linear\ndtype: float32\n"
                                                         f"tokenizer_source: {m['chat']}\nmodels:\n"
                                                         f"{weighted((m['chat'], 1), (m['tool'], 1))}\n"),
        ("tokenizer-table", "tokens, force, pad_to_multiple_of",
         f"merge_method: task_arithmetic\nbase_model: {m['chatbase']}\ndtype: float32\nmodels:\n"
         f"{weighted((m['chat'], 1), (m['tool'], 1))}\ntokenizer:\n  source: union\n  pad_to_multiple_of: 16\n"
         f"  tokens:\n    <|im_end|>:\n      source: {m['chat']}\n      force: true\n    <tool>:\n"
         f"      source: {{kind: model_token, model: {m['tool']}, token: the}}\n"),
        ("chat-template", "chat_template: chatml", f"merge_method: linear\ndtype: float32\nchat_template: chatml\n"
                                                   f"models:\n{weighted((a, 1), (b, 1))}\n"),
        ("chat-template-auto", "chat_template: auto", f"merge_method: linear\ndtype: float32\nchat_template: auto\n"
                                                      f"models:\n{weighted((c, 1), (b, 1))}\n"),
        ("stages-2", "mergekit-multi, 2 documents",
         f"name: blend\nmerge_method: slerp\nbase_model: {a}\ndtype: float32\nparameters: {{t: 0.3}}\nmodels:\n"
         f"{two()}\n---\nmerge_method: ties\nbase_model: {base}\ndtype: float32\nparameters: {{density: 0.5}}\n"
         f"models:\n{weighted(('blend', 0.7), (c, 0.3))}\n"),
        ("stages-3", "mergekit-multi, 3 documents",
         f"name: one\nmerge_method: linear\ndtype: float32\nmodels:\n{weighted((a, 1), (b, 1))}\n---\n"
         f"name: two\nmerge_method: slerp\nbase_model: one\ndtype: float32\nparameters: {{t: 0.5}}\nmodels:\n"
         f"  - model: one\n  - model: {c}\n---\nmerge_method: task_arithmetic\nbase_model: {base}\n"
         f"dtype: float32\nmodels:\n{weighted(('two', 1.0), (a, 0.5))}\n"),
    ]


def rows_by_token(path: Path, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Vocabulary tensors' rows keyed by `tensor|token`, by the output's own tokenizer."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(path).get_vocab()
    found = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for token, index in vocab.items():
            found[f"{name}|{token}"] = weights[name][index]
    return found


def compare(ours: Path, theirs: Path, by_token: bool) -> tuple[int, int, float, float]:
    """(elements, elements that differ, largest difference, largest difference in float32 roundings)."""
    a = {k: v for f in sorted(ours.glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted(theirs.glob("*.safetensors")) for k, v in load_file(f).items()}
    if by_token:
        a = {**{k: v for k, v in a.items() if "embed" not in k and "lm_head" not in k}, **rows_by_token(ours, a)}
        b = {**{k: v for k, v in b.items() if "embed" not in k and "lm_head" not in k}, **rows_by_token(theirs, b)}
    if set(a) != set(b):
        raise AssertionError(f"different tensors: {sorted(set(a) ^ set(b))[:3]}")
    total = differ = 0
    largest = roundings = 0.0
    for name, value in a.items():
        other = b[name].to(value.dtype)
        total += value.numel()
        differ += int((value != other).sum())
        gap = float((value.double() - other.double()).abs().max()) if value.numel() else 0.0
        scale = max(float(value.abs().max()), float(other.abs().max()), 1e-30) * torch.finfo(value.dtype).eps
        largest, roundings = max(largest, gap), max(roundings, gap / scale)
    return total, differ, largest, roundings


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/corpus").resolve()
    work.mkdir(parents=True, exist_ok=True)
    venv = Path(os.environ.get("MERGEKIT_VENV", ROOT / "bench-out" / "mergekit-venv")).resolve()
    if not (venv / "bin" / "mergekit-yaml").exists():
        raise SystemExit(f"no mergekit at {venv}: run `make mergekit-venv` first")
    found = models(work / "models")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    print("| config | features | elements | elements that differ | largest difference | verdict |")
    print("|---|---|---:|---:|---:|---|")
    for name, features, text in corpus(found):
        folder = work / name
        folder.mkdir(exist_ok=True)
        config = folder / "config.yml"
        config.write_text(text)
        theirs, ours = folder / "mergekit-out", folder / "mergecli-out"
        multi = "---" in text
        command = [str(venv / "bin" / ("mergekit-multi" if multi else "mergekit-yaml")), str(config)]
        command += ["--out-path", str(theirs), "--intermediate-dir", str(folder / "stages")] if multi else [str(theirs)]
        subprocess.run([*command, "--allow-crimes", "--quiet"], check=True, cwd=folder, env=env, capture_output=True)
        subprocess.run([str(Path(sys.executable).parent / "mergecli"), "merge", str(config), "-o", str(ours),
                        "--force", "-q"], check=True, cwd=folder)
        by_token = "token" in features or "union" in features or "tokenizer" in features
        total, differ, largest, roundings = compare(ours, theirs, by_token)
        verdict = "bit-identical" if differ == 0 else "float32 rounding" if roundings <= 2 else \
            "random mask" if name.startswith("dare") else f"differs ({roundings:.0f} roundings)"
        half = next((d for d in ("bfloat16", "float16") if f"dtype: {d}" in text and "out_dtype" not in text), None)
        if verdict.startswith("differs") and half:  # mergekit computes in its `dtype`: its float32 run, cast once
            exact = folder / "config-float32.yml"
            exact.write_text(text.replace(f"dtype: {half}", f"dtype: float32\nout_dtype: {half}"))
            subprocess.run([*command[:1], str(exact), str(folder / "mergekit-float32"), "--allow-crimes", "--quiet"],
                           check=True, cwd=folder, env=env, capture_output=True)
            again = compare(ours, folder / "mergekit-float32", by_token)
            if again[1] == 0 or again[3] <= 2:
                verdict = f"mergekit computes in {half}; its float32 run, cast once, gives mergecli's (" \
                          f"{'bit-identical' if again[1] == 0 else 'float32 rounding'})"
        print(f"| {name} | {features} | {total:,} | {differ:,} | {largest:.2g} | {verdict} |", flush=True)


if __name__ == "__main__":
    main()
