"""The package's layering: each folder imports only the folders below it (the table of
docs/design.md#layers), and no import cycles, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import deeppose_cli

PACKAGE = Path(deeppose_cli.__file__).parent


def module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its body (``from . import x``
    counts as importing ``x`` when ``x`` is a module)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    assert "deeppose_cli.training.stages" in graph["deeppose_cli.cli"]  # imported inside commands


def test_no_import_cycles():
    assert cycles(import_graph()) == []


# folder -> the folders its modules may import (besides their own)
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "engines": {"core", "data"},
    "training": {"core", "data", "engines"},
    "apps": {"core", "data", "engines", "training"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else parts[-1]


def test_each_folder_imports_only_the_folders_below_it():
    graph = import_graph()
    wrong = []
    for module, imported in sorted(graph.items()):
        layer = layer_of(module)
        if layer not in ALLOWED:
            continue  # the top: cli.py, __init__, __main__
        for target in sorted(imported):
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in ALLOWED[layer] \
                    and target != "deeppose_cli":
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_layer_check_sees_a_wrong_import():
    assert layer_of("deeppose_cli.core.cascade") == "core"
    assert layer_of("deeppose_cli.cli") == "cli"
    assert "data" not in ALLOWED["core"] and "training" not in ALLOWED["engines"]
