"""Reading mergekit's YAML as strictly as a TOML recipe: a regular file of at most `MAX_BYTES`, parsed
by PyYAML's safe composer (libyaml where it is installed), and turned into plain values by mergecli,
never by a constructor: strings, numbers, booleans, null, lists and mappings, nothing else.

Every value keeps its line, so that a problem found later (an unknown key, a weight that is not a
number) is said with the line it is on. Refused, each in one line: a file that is not a regular file
(a FIFO, a device), a file over the size limit, text that is not UTF-8 or not YAML, a key given twice,
a tag other than the standard ones (`!!set`, `!!python/...`), a number too long to be one, a string
with a lone surrogate, and documents larger or deeper than any config (aliases count every time
they are used, so a "billion laughs" file is refused, not expanded).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergecli.errors import RecipeError, file_kind

MAX_BYTES = 1_000_000  # published mergekit configs are a few KB; a chat template some more
MAX_NODES = 20_000  # values in all the documents of a file, aliases counted each time they are used
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 64  # a number written with more characters is not a setting
Path_ = tuple[Any, ...]  # a value's place: keys and list indexes from the document's root

_STANDARD = "tag:yaml.org,2002:"
_SCALARS = yaml.constructor.SafeConstructor()
_Composer = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Document:
    """One YAML document: its plain value, and the line (1-based) of every value in it."""

    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    source: str = "config"

    def line(self, path: Path_) -> int | None:
        """The line of the value at `path`, or of the nearest value above it."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path)

    def where(self, path: Path_) -> str:
        """`line 7: models.1.parameters.weight`: how a problem names its place."""
        line = self.line(path)
        key = ".".join(str(part) for part in path) or "(document)"
        return f"line {line}: {key}" if line else key

    def error(self, path: Path_, problem: str, *, hint: str | None = None) -> RecipeError:
        return RecipeError(self.source, [f"{self.where(path)}: {problem}"], hint=hint)


def read_text(path: Path) -> str:
    """The text of a config file: a regular file (a link to one is followed), UTF-8, at most MAX_BYTES.

    Raises:
        RecipeError: no such file, not a regular file (a FIFO, a device, a folder), too large, not UTF-8.
    """
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, and is then refused
    except FileNotFoundError:
        raise RecipeError(source, ["no such file"]) from None
    except OSError as exc:
        raise RecipeError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RecipeError(source, [f"is {file_kind(mode)}, not a regular file"])
        data = os.read(fd, MAX_BYTES + 1)
        while len(data) <= MAX_BYTES:
            more = os.read(fd, MAX_BYTES + 1 - len(data))
            if not more:
                break
            data += more
    except OSError as exc:
        raise RecipeError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise RecipeError(source, [f"is larger than {MAX_BYTES // 1000:,} KB; a config is a few KB"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(source, [f"is not UTF-8 text (byte {exc.start})"]) from None


def load_documents(path: Path) -> list[Document]:
    """The documents of a YAML file (one, or several separated by `---`), as plain values with lines.

    Raises:
        RecipeError: one line naming the file, the line and the problem.
    """
    return parse_documents(read_text(path), source=str(path))


def parse_documents(text: str, *, source: str = "config") -> list[Document]:
    """The documents of YAML `text` (see `load_documents`)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RecipeError(source, [f"is larger than {MAX_BYTES // 1000:,} KB; a config is a few KB"])
    try:
        nodes = list(yaml.compose_all(text, Loader=_Composer))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(source, [f"{where}not valid YAML ({problem})"]) from None
    except RecursionError:
        raise RecipeError(source, ["not valid YAML (nested too deeply)"]) from None
    budget = [MAX_NODES]
    documents = []
    for node in nodes:
        document = Document(None, source=source)
        if node is not None:
            document.data = _value(node, (), document, budget, 0)
        documents.append(document)
    return documents


def _value(node: yaml.Node, path: Path_, document: Document, budget: list[int], depth: int) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise document.error(path, f"the file holds more than {MAX_NODES:,} values; a config holds a few hundred")
    if depth > MAX_DEPTH:
        raise document.error(path, f"values nested more than {MAX_DEPTH} deep")
    document.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        return _mapping(node, path, document, budget, depth)
    if isinstance(node, yaml.SequenceNode):
        if node.tag != _STANDARD + "seq":
            raise document.error(path, f"a {_tag(node)} is not a value a config holds")
        return [_value(item, (*path, index), document, budget, depth + 1) for index, item in enumerate(node.value)]
    return _scalar(node, path, document)


def _mapping(node: yaml.MappingNode, path: Path_, document: Document, budget: list[int], depth: int) -> dict:
    if node.tag != _STANDARD + "map":
        raise document.error(path, f"a {_tag(node)} is not a value a config holds")
    found: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _STANDARD + "null":
            document.lines[(*path, "(key)")] = line
            raise document.error((*path, "(key)"), "a key that is not a name (a list, a mapping or null)")
        document.lines[(*path, key_node.value)] = line
        if key_node.tag == _STANDARD + "merge":
            raise document.error((*path, "<<"), "YAML merge keys (<<) are not read; write the keys out")
        key = _text(key_node.value, (*path, key_node.value), document)
        if key in found:
            raise document.error((*path, key), f"given twice (also on line {first_line[key]}); the last one "
                                               "would silently win")
        first_line[key] = line
        found[key] = _value(value_node, (*path, key), document, budget, depth + 1)
    return found


def _scalar(node: yaml.ScalarNode, path: Path_, document: Document) -> Any:
    tag = node.tag.removeprefix(_STANDARD)
    if tag == "str":
        return _text(node.value, path, document)
    if tag in ("int", "float"):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise document.error(path, f"a number of {len(node.value):,} characters")
        try:
            number = _SCALARS.construct_yaml_int(node) if tag == "int" else _SCALARS.construct_yaml_float(node)
        except ValueError:
            raise document.error(path, f"{node.value[:40]!r} is not a number") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise document.error(path, f"{node.value!r} is not a finite number")
        return number
    if tag == "bool":
        return _SCALARS.construct_yaml_bool(node)
    if tag == "null":
        return None
    if tag == "timestamp":  # a date-like value: its text, as written
        return _text(node.value, path, document)
    raise document.error(path, f"a {_tag(node)} is not a value a config holds")


def _text(value: str, path: Path_, document: Document) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise document.error(path, "a string that is not valid Unicode (a lone surrogate, "
                                   f"\\u{ord(value[_surrogate(value)]):04x})") from None
    return value


def _surrogate(value: str) -> int:
    return next(i for i, char in enumerate(value) if 0xD800 <= ord(char) <= 0xDFFF)


def _tag(node: yaml.Node) -> str:
    tag = node.tag
    return f"!!{tag.removeprefix(_STANDARD)}" if tag.startswith(_STANDARD) else f"{tag} tag"
