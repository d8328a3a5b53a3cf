"""One house: danlu's modules import each other without cycles (imports inside functions count: a cycle deferred
to call time is still two modules that cannot be understood, tested or moved apart), and no module reaches into
another's `_private` names. Read from the source with `ast`, nothing imported."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

SRC = Path(importlib.util.find_spec("danlu").submodule_search_locations[0]).parent  # the danlu under test, unrun


def _modules() -> dict[str, Path]:
    """'danlu.engine.build' -> its file; a package is named by its __init__.py."""
    out = {}
    for f in sorted((SRC / "danlu").rglob("*.py")):
        parts = f.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The danlu module a dotted name lives in: the longest prefix that is a module ('danlu.io.write_json' ->
    'danlu.io'), or None outside danlu."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(the danlu module imported, the name taken from it or None, line) for every import statement in `module`,
    at any depth (inside functions and classes too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_owner(a.name), None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # from danlu.data import loader: the module danlu.data.loader
                    found.append((sub, None, node.lineno))
                else:  # from danlu.io import write_json: a name from danlu.io
                    found.append((_owner(base), a.name, node.lineno))
    return [(m, name, line) for m, name, line in found if m is not None and m != module]


def _graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: the first line}. The top package `danlu` is left out as a target: it only
    re-exports the public API (`from danlu import train`), which every module may use without depending on the
    modules behind it."""
    graph: dict[str, dict[str, int]] = {m: {} for m in MODULES}
    for m in MODULES:
        for target, _, line in _imports(m):
            if target != "danlu":
                graph[m].setdefault(target, line)
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path a -> b -> ... -> a) through each group of modules that import each other, found by depth-
    first search: an edge back to a module still on the search path closes a cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []
    cycles, seen = [], set()

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    cycles.append(cycle)
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_the_walk_finds_imports_and_cycles():
    """The checker itself, on a graph and on a file whose imports are known."""
    assert _cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}, "c": {"a": 2, "b": 3}}) == []
    found = {(m, name) for m, name, _ in _imports("danlu.cli")}
    assert ("danlu.errors", "DanluError") in found  # a top-level import
    assert ("danlu.api", "evaluate") in found  # an import inside a function counts
    assert _owner("danlu.engine.build.build") == "danlu.engine.build" and _owner("torch.nn") is None


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, graph) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{m} line {line}: {name} from {target}" for m in MODULES for target, name, line in _imports(m)
           if name and name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)
