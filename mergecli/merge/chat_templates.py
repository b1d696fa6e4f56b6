"""The output's chat template (`chat_template`): a named one (the chat formats mergekit names:
ChatML, Llama 3, Mistral's [INST], Alpaca, EXAONE), "auto" (the one most of the inputs have), or the
Jinja text given. It goes into the output's `tokenizer_config.json`, and into its `chat_template.jinja`
where the output has that file (transformers reads that file first).

The named templates are written here from the formats they implement, rendered by transformers'
sandboxed Jinja (whitespace after a block tag is dropped, as transformers does).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mergecli.errors import CheckpointError
from mergecli.io.files import regular_file
from mergecli.methods.base import Inputs

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"

NAMED = {
    # ChatML: each message framed by <|im_start|>ROLE and <|im_end|>
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: the BOS token, then each message under a header, its text trimmed, ended by <|eot_id|>
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Mistral: BOS, then [INST] user [/INST] answer EOS pairs; a system message leads the first instruction
    "mistral": (
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('the roles must alternate user, assistant, user, ... after an optional system "
        "message') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is defined %}"
        "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, and a first system message') }}{% endif %}"
        "{% endfor %}"
    ),
    # Alpaca: the system text, then ### Instruction / ### Input / ### Response sections
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (systems | last).content | trim if systems else '' }}{{ '\\n\\n' }}"
        "{% for message in messages %}"
        "{% set heading = {'user': 'Instruction', 'assistant': 'Response', 'user_context': 'Input'}"
        ".get(message['role']) %}"
        "{% if heading %}{{ '### ' + heading + ':\\n' + (message['content'] | trim) }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}"
        "{% endif %}"
    ),
    # EXAONE: [|role|] tags, an empty system turn first when there is none
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def input_template(directory: Path | None, root: Path | None) -> str | None:
    """An input's own chat template: its chat_template.jinja, else its tokenizer_config.json's."""
    if directory is None:
        return None
    if regular_file(directory / TEMPLATE_FILE, root or directory):
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8").strip() or None
    if not regular_file(directory / CONFIG_FILE, root or directory):
        return None
    try:
        template = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((entry.get("template") for entry in template if isinstance(entry, dict)
                         and entry.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def chosen_template(setting: str | None, inputs: Inputs) -> str | None:
    """The template the recipe's `chat_template` asks for: a named one's text, the inputs' most common
    (`auto`; None when no input has one), or the Jinja text given."""
    if setting is None:
        return None
    if setting in NAMED:
        return NAMED[setting]
    if setting == "auto":
        found = [input_template(c.directory, c.root) for c in inputs.all]
        found = [template for template in found if template]
        return Counter(found).most_common(1)[0][0] if found else None
    return setting


def write_template(directory: Path, template: str) -> None:
    """Put `template` into the output's tokenizer_config.json (and its chat_template.jinja, if any).

    Raises:
        CheckpointError: the output has no tokenizer_config.json to hold it.
    """
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(directory, "chat_template: the output has no tokenizer to hold a chat template",
                              hint="merge models with tokenizer files (copy_tokenizer = true)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if (directory / TEMPLATE_FILE).is_file():
        (directory / TEMPLATE_FILE).write_text(template)
