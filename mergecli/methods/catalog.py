"""The built-in methods, found without importing any: each module of this package (and its folders)
whose `Method` subclass declares `name = "..."` is read with `ast` for that name, its `mergekit`
names and its one-line `help`. So a new method is one new file, which `--help` lists at once without
importing torch; the registry imports the module only when a recipe names its method.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DECLARED = ("name", "help", "mergekit")  # the class attributes read from a method's source


@dataclass(frozen=True)
class Entry:
    """A built-in method, as its file declares it."""

    name: str
    module: str  # the module that registers it
    help: str  # one line: what it does
    mergekit: tuple[str, ...] = ()  # mergekit's names for it (its `merge_method`)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _literal(node: ast.expr) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _declared(cls: ast.ClassDef) -> dict[str, object]:
    found: dict[str, object] = {}
    for statement in cls.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) and statement.value is not None else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id in DECLARED:
                found[target.id] = _literal(statement.value)
    return found


@lru_cache(maxsize=1)
def _scan(stamp: tuple[tuple[str, float], ...]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for name, _ in stamp:
        path = Path(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            declared = _declared(node)
            if isinstance(declared.get("name"), str):
                mergekit = declared.get("mergekit") or ()
                entries[declared["name"]] = Entry(declared["name"], _module_name(path), str(declared.get("help", "")),
                                                  (mergekit,) if isinstance(mergekit, str) else tuple(mergekit))
    return entries


def builtin() -> dict[str, Entry]:
    """Every built-in method by name (the package's files read again when one changed or was added)."""
    files = sorted(PACKAGE.rglob("*.py"))
    return _scan(tuple((str(path), path.stat().st_mtime) for path in files))
