"""The package's shape: imports go down the layers and never in a circle, each module is small and
says what it owns. Read from the source with `ast`, so that an import inside a function counts too."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mergecli"
# From the bottom up: a module may import its own package or a lower layer, never a higher one.
LAYERS = ["mergecli.errors", "mergecli.exact", "mergecli.recipe", "mergecli.io", "mergecli.stats", "mergecli.methods",
          "mergecli.publish", "mergecli.merge", "mergecli.cli", "mergecli.__main__"]
# Where an import may sit inside a function: only in the command line, to keep --help fast, and
# in the entry point, which installs its signal handlers before importing anything.
LAZY_IMPORTS_ALLOWED = ("mergecli.cli", "mergecli.__main__")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported mergecli module, whether the import sits inside a function) for each import. A string
    that names a mergecli module (a registry's `import_module` target) counts as an import."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Constant) and isinstance(child.value, str) and child.value in known:
                targets = [child.value]
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # `from mergecli.methods import base` imports the module mergecli.methods.base
                targets = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module
                           for a in child.names]
            found.extend((t, inside) for t in targets if t == "mergecli" or t.startswith("mergecli."))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def layer(name: str) -> int:
    for rank, prefix in enumerate(LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (as the list of its nodes, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: {target for target, _ in imports(path, known) if target != "mergecli"}
            for name, path in modules().items() if name != "mergecli"}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_imports_go_down_the_layers():
    known = set(modules())
    wrong = []
    for name, path in modules().items():
        if name == "mergecli":
            continue
        for target, inside_function in imports(path, known):
            if target == "mergecli":  # the package root holds only __version__ and the lazy public API
                continue
            up = layer(target) > layer(name)
            sideways = layer(target) == layer(name) and package(target) != package(name)
            if up or sideways:
                wrong.append(f"{name} imports {target}")
            if inside_function and not name.startswith(LAZY_IMPORTS_ALLOWED):
                wrong.append(f"{name} imports {target} inside a function")
    assert wrong == []


def test_a_registry_string_that_points_up_is_an_import_that_points_up(tmp_path):
    module = tmp_path / "registry.py"
    module.write_text('"""A registry."""\nMETHODS = {"x": "mergecli.cli.app"}\n')
    assert ("mergecli.cli.app", False) in imports(module, set(modules()))


def test_builtin_methods_live_in_methods():
    from mergecli.methods.registry import builtin_modules

    assert all(module.startswith("mergecli.methods.") for module in builtin_modules().values())


def test_builtin_methods_are_registered_by_their_own_module():
    from mergecli.methods.registry import builtin_modules, get_method

    for name, module in builtin_modules().items():
        assert get_method(name).name == name and type(get_method(name)).__module__ == module
        importlib.import_module(module)  # exists


@pytest.mark.parametrize("name", sorted(modules()))
def test_each_module_is_small_and_says_what_it_owns(name):
    path = modules()[name]
    tree = ast.parse(path.read_text())
    docstring = ast.get_docstring(tree)
    assert docstring and len(docstring.split()) >= 8, f"{name}: no docstring saying what it owns"
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name}: over {MAX_LINES} lines"
