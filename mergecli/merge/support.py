"""Support files of an output: config.json (with the output dtype), tokenizer and processor files,
the model card, and mergecli.toml, the recipe as run.

They are chosen and read when the merge is planned (a broken config.json fails before any tensor
is read). A support file is copied only if it is a regular file, or a link that stays inside its
input's own tree; no file written names a local absolute path: `mergecli.toml` records local inputs
relative to the output, with their digest, and path-valued keys of copied JSON files are reduced
to the last component.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergecli.errors import CheckpointError, MergecliError, RecipeError
from mergecli.io.checkpoint import Checkpoint
from mergecli.io.files import CARD_FILE, TOKENIZER_FILES, regular_file
from mergecli.merge.card import render_card
from mergecli.merge.chat_templates import chosen_template, write_template
from mergecli.merge.vocabulary import Vocabulary
from mergecli.methods.base import Inputs, Method
from mergecli.recipe import WEIGHT_SUFFIXES, Recipe, dump_recipe, path_keys
from mergecli.recipe.schema import STAGE

PATH_KEYS = ("_name_or_path", "name_or_path")  # keys transformers fills with the directory it loaded


@dataclass
class SupportFiles:
    """What goes beside the weights, and where it comes from (input labels for the card)."""

    config: dict[str, Any] | None = None
    config_from: str | None = None
    copies: dict[str, Path] = field(default_factory=dict)  # output file (relative path) → its source
    tokenizer_from: str | None = None
    pipeline_from: str | None = None  # where the sentence-transformers pipeline (modules.json) came from
    added_tokens: list[tuple[str, bool]] = field(default_factory=list)  # (token, special) added to the tokenizer
    license: str | None = None  # from the reference's model card (else the first model's that has one)
    chat_template: str | None = None  # the recipe's chat template, written into the output's tokenizer


def _labels(recipe: Recipe, inputs: Inputs) -> list[tuple[str, Checkpoint]]:
    """The inputs in the order support files are looked for: the reference, then the models."""
    return list(zip(recipe.input_names, inputs.all))


def _safe(checkpoint: Checkpoint, name: str, warnings: list[str]) -> Path | None:
    """`name` in the checkpoint's directory, if it may be read: a link out of the input is skipped. An
    earlier stage's output, planned but not yet written, will hold the files its plan copies."""
    planned = getattr(checkpoint, "planned_files", None)
    if planned is not None:
        return planned.get(name)
    if checkpoint.directory is None:
        return None
    path = checkpoint.directory / name
    if not path.is_file():
        return None
    if not regular_file(path, checkpoint.root or checkpoint.directory):
        warnings.append(f"{path} links to {os.path.realpath(path)}, outside its input: not copied")
        return None
    return path


LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")  # a config's depth, by family


def sliced_config(config: dict[str, Any], layers: list[tuple[int, int]], inputs: Inputs) -> dict[str, Any]:
    """The config of an output made of slices: its depth the slices' layers, and every per-layer list
    (`layer_types`, sliding-window patterns) those layers' entries, from the config of the input each
    output layer comes from."""
    depth = next((config[key] for key in LAYER_COUNTS if isinstance(config.get(key), int)), None)
    configs = [checkpoint.config() or config for checkpoint in inputs.all]
    out = dict(config)
    for key in LAYER_COUNTS:
        if isinstance(config.get(key), int):
            out[key] = len(layers)
    for key, value in config.items():
        if isinstance(value, list) and depth is not None and len(value) == depth:
            out[key] = [(configs[source].get(key) or value)[layer] for source, layer in layers]
    return out


def plan_support(recipe: Recipe, inputs: Inputs, warnings: list[str], vocabulary: Vocabulary | None = None, *,
                 layers: list[tuple[int, int]] | None = None) -> SupportFiles:
    """Choose the config and the tokenizer / processor files of the output, and read the config: with a
    united `vocabulary`, the tokenizer of the input it comes from (and the tokens it adds to it), and
    the config's vocab_size its rows; with slices (`layers`: each output layer's input and layer), the
    config's depth and per-layer lists those of the slices.

    Raises:
        CheckpointError: the chosen config.json is not a JSON object.
    """
    support = SupportFiles()
    named = _labels(recipe, inputs)
    for label, checkpoint in named:
        path = _safe(checkpoint, "config.json", warnings)
        if path is not None:
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(config, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise CheckpointError(path, "is not a valid config (a JSON object)") from None
            support.config, support.config_from = sliced_config(config, layers, inputs) if layers else config, label
            _plan_pipeline(support, label, checkpoint, warnings)
            break
    support.license = next(filter(None, (card_license(_safe(ckpt, CARD_FILE, warnings)) for _, ckpt in named)), None)
    if vocabulary is not None:
        if support.config is not None:
            text = support.config.get("text_config")
            holder = text if isinstance(text, dict) and "vocab_size" in text else support.config
            holder["vocab_size"] = vocabulary.rows
        named.sort(key=lambda pair: pair[0] != vocabulary.source)  # its tokenizer first
        support.added_tokens = list(vocabulary.added)
    support.chat_template = chosen_template(recipe.chat_template, inputs)
    if support.chat_template is not None and not recipe.copy_tokenizer:
        raise RecipeError(recipe.source, [recipe.locate("chat_template: it goes into the output's tokenizer, which "
                                                        "copy_tokenizer = false leaves out")])
    if not recipe.copy_tokenizer:
        return support
    if vocabulary is not None and vocabulary.external is not None:  # a model the merge does not read
        external = vocabulary.external
        support.tokenizer_from = vocabulary.source
        support.copies.update({name: external.directory / name for name in TOKENIZER_FILES
                               if regular_file(external.directory / name, external.root)})
        return support
    for marker in ("tokenizer_config.json", "preprocessor_config.json"):
        for label, checkpoint in named:
            if _safe(checkpoint, marker, warnings) is not None:
                support.tokenizer_from = label
                for name in TOKENIZER_FILES:
                    path = _safe(checkpoint, name, warnings)
                    if path is not None:
                        support.copies[name] = path
                return support
    if support.chat_template is not None:
        raise CheckpointError(inputs.reference.source, "chat_template: no input has tokenizer files to hold it")
    if support.config is not None:  # a transformers checkpoint without a tokenizer is worth a word
        warnings.append("copy_tokenizer: no input has tokenizer files; none copied")
    return support


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _plan_pipeline(support: SupportFiles, label: str, checkpoint: Checkpoint, warnings: list[str]) -> None:
    """A sentence-transformers model's pipeline (modules.json, and each module's folder: pooling,
    normalization) goes with the merged weights, from the input that gives the config: without it,
    `SentenceTransformer(output)` builds another pipeline (no normalization, other pooling)."""
    modules_file = _safe(checkpoint, "modules.json", warnings)
    if modules_file is None or checkpoint.directory is None:
        return
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        folders = [str(m.get("path", "")) for m in modules if isinstance(m, dict)]
    except (ValueError, UnicodeDecodeError, RecursionError, AttributeError, TypeError):
        warnings.append(f"{modules_file} is not a sentence-transformers modules list: the pipeline was not copied")
        return
    support.pipeline_from = label
    for name in SENTENCE_TRANSFORMERS_FILES:
        path = _safe(checkpoint, name, warnings)
        if path is not None:
            support.copies[name] = path
    for folder in folders:
        if not folder or ".." in Path(folder).parts or Path(folder).is_absolute():
            continue
        for path in sorted((checkpoint.directory / folder).rglob("*")):
            relative = path.relative_to(checkpoint.directory).as_posix()
            if path.is_file() and _safe(checkpoint, relative, warnings) is not None:
                support.copies[relative] = path
                if path.name.endswith(WEIGHT_SUFFIXES):
                    warnings.append(f"the pipeline module {folder} holds weights of its own ({path.name}), which "
                                    f"are not merged: copied from {label}")


LICENSE_LINE = re.compile(r"""license:[ \t]*["']?([A-Za-z0-9][A-Za-z0-9._+-]*)["']?[ \t]*""")


def card_license(card: Path | None) -> str | None:
    """The `license:` of a model card's YAML front matter (a license id such as apache-2.0)."""
    if card is None:
        return None
    try:
        text = card.read_text(encoding="utf-8", errors="replace")[:100_000]
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.splitlines()[1:]:
        if line.strip() == "---":
            break
        match = LICENSE_LINE.fullmatch(line)
        if match:
            return match.group(1)
    return None


def add_tokens(directory: Path, added: list[tuple[str, bool]]) -> None:
    """Add the united vocabulary's new tokens to the tokenizer written in `directory`, through
    transformers (so that every file it reads agrees), and check they got the rows planned for them.

    Raises:
        MergecliError: the tokenizer numbered them otherwise.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    first = len(tokenizer)
    for content, special in added:
        tokenizer.add_tokens([AddedToken(content, special=special, normalized=not special)], special_tokens=special)
    for row, (content, _) in enumerate(added, start=first):
        if tokenizer.convert_tokens_to_ids(content) != row:
            raise MergecliError(f"the output's tokenizer numbers the added token {content!r} "
                                f"{tokenizer.convert_tokens_to_ids(content)}, its row is {row}",
                                hint="use tokenizer = \"base\" for this tokenizer")
    tokenizer.save_pretrained(directory)


def scrub(value: Any) -> Any:
    """A JSON value with every path-valued key (`_name_or_path`) that holds an absolute local path
    reduced to its last component."""
    if isinstance(value, dict):
        return {key: (os.path.basename(v.rstrip("/\\")) if key in PATH_KEYS and isinstance(v, str)
                      and os.path.isabs(v) else scrub(v)) for key, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def resolved_recipe(recipe: Recipe, inputs: Inputs, output: Path, *, normalize: bool, stage: bool = False) -> Recipe:
    """The recipe as run, for mergecli.toml: hub revisions pinned to their commits; local inputs,
    data and the method's paths (stats_dir) relative to the output directory (no absolute path is
    published) and identified by their digest; `output = "."`; `normalize` as the method applied it.
    """

    def where(path: str) -> str:
        return os.path.relpath(path, output)

    def pinned(spec: Any, checkpoint: Checkpoint) -> Any:
        if spec.path.startswith(STAGE):  # an earlier stage: its recipe is recorded beside
            return spec
        if checkpoint.commit:
            return spec.model_copy(update={"revision": checkpoint.commit})
        update = {"path": where(spec.path), "digest": checkpoint.digest()}
        if getattr(spec, "data", None):
            update["data"] = where(spec.data)
        if getattr(spec, "base", None) and os.path.isabs(spec.base):  # a LoRA adapter's base
            update["base"] = where(spec.base)
        return spec.model_copy(update=update)

    update: dict[str, Any] = {"normalize": normalize,
                              "models": [pinned(s, c) for s, c in zip(recipe.models, inputs.models)]}
    if not stage:  # a stage writes no output of its own
        update["output"] = "."
    names = [spec.name for spec in recipe.models]
    if recipe.tokenizer not in ("base", "union", *names) and os.path.isabs(recipe.tokenizer):
        update["tokenizer"] = where(recipe.tokenizer)  # a model the merge does not read: its tokenizer
    if recipe.base and inputs.base:
        update["base"] = pinned(recipe.base, inputs.base)
    resolved = recipe.model_copy(update=update)
    settings = recipe.settings
    if settings is not None:
        settings = settings.model_copy(update={key: where(getattr(settings, key)) for key in path_keys(type(settings))})
    resolved.bind(settings, [spec.settings for spec in recipe.models])
    return resolved


def with_stages(recipe: Recipe, stages: list[Recipe]) -> Recipe:
    """The resolved recipe with its stages' resolved recipes (each bound to its method)."""
    resolved = recipe.model_copy(update={"stages": stages})
    resolved.bind(recipe.settings, [spec.settings for spec in recipe.models])
    return resolved


def write_support_files(directory: Path, *, support: SupportFiles, recipe: Recipe, method: Method,
                        dtype: str, sizes: dict[str, int], directory_name: str,
                        notes: dict[str, list[str]] | None = None, quantization: dict | None = None,
                        adapter: Any = None) -> None:
    """config.json (with the output dtype), tokenizer files, mergecli.toml and the model card.

    Args:
        notes: per task kind, why tensors of that kind were merged as they were (`TensorTask.note`).
        recipe: the resolved recipe (`resolved_recipe`).
        directory_name: the output's final name (`directory` is its temporary sibling).
        dtype: the output's floating dtype ("bfloat16"), for the config.
        sizes: bytes of each input by its label, for the card.
        quantization: the output's quantization_config (fp8 block-scaled); None: its weights are plain, and
            an input's quantization_config is not carried over.
        adapter: the output is a LoRA adapter (merge/lora_extract.py's AdapterWriter): no config.json (PEFT
            reads its base's), and the card gives each matrix's error.
    """
    config = None
    if support.config is not None:
        config = scrub(support.config)
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = dtype
        for holder in (config, config.get("text_config")):
            if isinstance(holder, dict):
                holder.pop("quantization_config", None)
        if quantization is not None:
            config["quantization_config"] = quantization
        if adapter is None:
            (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, source in support.copies.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".json"):
            try:
                content = scrub(json.loads(source.read_text(encoding="utf-8")))
            except (ValueError, UnicodeDecodeError, RecursionError):
                shutil.copyfile(source, directory / name)  # not ours to fix: copied as it is
                continue
            (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        else:
            shutil.copyfile(source, directory / name)
    if support.added_tokens and support.tokenizer_from is not None:
        add_tokens(directory, support.added_tokens)
    if support.chat_template is not None:
        write_template(directory, support.chat_template)
    (directory / "mergecli.toml").write_text(dump_recipe(recipe))
    card = render_card(recipe, method, config=config, title=directory_name, config_from=support.config_from,
                       pipeline_from=support.pipeline_from,
                       tokenizer_from=support.tokenizer_from, sizes=sizes, license=support.license, notes=notes)
    if adapter is not None:
        card += "\n## The LoRA adapter\n\nThe merge's difference from its base, as a truncated SVD of each matrix.\n\n"
        card += adapter.summary()
    (directory / "README.md").write_text(card)
