"""One house: danlu's modules import each other without cycles (imports inside functions count: a cycle deferred
to call time is still two modules that cannot be understood, tested or moved apart), and no module reaches into
another's `_private` names. Read from the source with `ast`, nothing imported.

A cycle is counted as /work/shared/checks/import-cycles.sh counts it: importing `a.b.c` runs package `a.b`'s
`__init__.py` first, so it counts as importing `a.b` too (except from inside `a.b`, whose own modules may import
each other beside their `__init__`); each group of modules that reach each other (a strongly connected component of
more than one module) is one cycle."""
from __future__ import annotations

import ast
import importlib.util
from collections import deque
from pathlib import Path

SRC = Path(importlib.util.find_spec("danlu").submodule_search_locations[0]).parent  # the danlu under test, unrun
TOP = "danlu"


def _modules(src: Path = SRC) -> dict[str, Path]:
    """'danlu.engine.build' -> its file; a package is named by its __init__.py."""
    out = {}
    for f in sorted((src / TOP).rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _owner(name: str, modules: dict[str, Path] = MODULES) -> str | None:
    """The danlu module a dotted name lives in: the longest prefix that is a module ('danlu.io.write_json' ->
    'danlu.io'), or None outside danlu."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, modules: dict[str, Path] = MODULES) -> list[tuple[str, str | None, int]]:
    """(the danlu module imported, the name taken from it or None, line) for every import statement in `module`,
    at any depth (inside functions and classes too)."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(_owner(a.name, modules), None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x / from ..y import z
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:  # from danlu.data import loader: the module danlu.data.loader
                    found.append((sub, None, node.lineno))
                else:  # from danlu.io import write_json: a name from danlu.io
                    found.append((_owner(base, modules), a.name, node.lineno))
    return [(m, name, line) for m, name, line in found if m is not None and m != module]


def _packages_run_first(target: str, importer: str, modules: dict[str, Path] = MODULES) -> list[str]:
    """The packages whose __init__.py Python runs before `target` when `importer` imports it: every package
    enclosing `target` below the top one ('danlu.data.loader' -> ['danlu.data']), except `importer` itself and the
    packages `importer` lives in (it is already being imported through them)."""
    out, up = [], target.rpartition(".")[0]
    while up != TOP and "." in up:
        if up in modules and up != importer and not importer.startswith(up + "."):
            out.append(up)
        up = up.rpartition(".")[0]
    return out


def _graph(modules: dict[str, Path] = MODULES) -> dict[str, dict[str, str]]:
    """module -> {module it imports: where (the first import line, and the import that runs a package's
    __init__)}. The top package `danlu` is left out as a target: it only re-exports the public API (`from danlu
    import train`), which every module may use without depending on the modules behind it."""
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for m in modules:
        for target, _, line in _imports(m, modules):
            if target == TOP:
                continue
            graph[m].setdefault(target, f"line {line}")
            for package in _packages_run_first(target, m, modules):
                graph[m].setdefault(package, f"line {line}, importing {target} runs {package}'s __init__.py")
    return graph


def _cycle_groups(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop: the strongly connected components
    of more than one module (Tarjan's algorithm), each sorted, in sorted order. One group is one cycle, however
    many loops run through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


def _a_loop(group: list[str], graph: dict[str, dict[str, str]]) -> list[str]:
    """The shortest path group[0] -> ... -> group[0] inside the group (breadth-first), to name in a failure."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    todo = deque([start])
    while todo:
        v = todo.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in came_from:
                came_from[w] = v
                todo.append(w)
    raise AssertionError(f"{group} is not a cycle group")


def _describe(group: list[str], graph: dict[str, dict[str, str]]) -> str:
    loop = _a_loop(group, graph)
    steps = " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(loop, loop[1:])) + f" -> {loop[-1]}"
    return f"{len(group)} modules ({', '.join(group)}), e.g. {steps}"


def _write_tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return _modules(root)


def test_a_group_of_modules_that_reach_each_other_is_one_cycle():
    """The checker's count on graphs whose groups are known: a loop of three; two loops through one module are one
    group (as the shared check counts them), a module that only imports into a group is outside it."""
    assert _cycle_groups({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]
    assert _cycle_groups({"a": {"b": "", "c": ""}, "b": {"a": ""}, "c": {"a": ""}}) == [["a", "b", "c"]]
    assert _cycle_groups({"a": {"b": "", "x": ""}, "b": {"a": ""}, "x": {"y": ""}, "y": {"x": ""}}) == \
        [["a", "b"], ["x", "y"]]
    assert _cycle_groups({"a": {"b": ""}, "b": {}, "c": {"a": "", "b": ""}}) == []
    graph = {"a": {"b": "line 1"}, "b": {"c": "line 2", "a": "line 5"}, "c": {"a": "line 3"}}
    assert _a_loop(["a", "b", "c"], graph) == ["a", "b", "a"]  # the shortest loop through a


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """No module imports back directly, but danlu/engine/__init__.py re-exports the loop, the loop imports the
    loader, and the loader's import of danlu.engine.devices runs danlu/engine/__init__.py first: a cycle. The
    loop's own import of danlu.engine.devices (inside the package) is not one."""
    modules = _write_tree(tmp_path, {
        "danlu/__init__.py": "",
        "danlu/engine/__init__.py": "from danlu.engine.loop import train_loop\n",
        "danlu/engine/loop.py": "from danlu.data.loader import DeviceLoader\nfrom danlu.engine.devices import cpu\n",
        "danlu/engine/devices.py": "cpu = 'cpu'\n",
        "danlu/data/__init__.py": "",
        "danlu/data/loader.py": "def DeviceLoader():\n    from danlu.engine.devices import cpu\n    return cpu\n",
    })
    graph = _graph(modules)
    assert graph["danlu.data.loader"] == {
        "danlu.engine.devices": "line 2",
        "danlu.engine": "line 2, importing danlu.engine.devices runs danlu.engine's __init__.py"}
    assert "danlu.engine" not in graph["danlu.engine.loop"]  # its own package: not a cycle
    assert graph["danlu.engine.loop"]["danlu.data"].endswith("runs danlu.data's __init__.py")
    groups = _cycle_groups(graph)
    assert groups == [["danlu.data.loader", "danlu.engine", "danlu.engine.loop"]]
    assert _describe(groups[0], graph).endswith(
        "danlu.data.loader (line 2, importing danlu.engine.devices runs danlu.engine's __init__.py) -> danlu.engine "
        "(line 1) -> danlu.engine.loop (line 1) -> danlu.data.loader")

    (tmp_path / "danlu/engine/__init__.py").write_text("")  # the package no longer imports its loop: no cycle
    assert _cycle_groups(_graph(_modules(tmp_path))) == []


def test_the_walk_finds_imports_at_any_depth():
    found = {(m, name) for m, name, _ in _imports("danlu.cli")}
    assert ("danlu.errors", "DanluError") in found  # a top-level import
    assert ("danlu.api", "evaluate") in found  # an import inside a function counts
    assert _owner("danlu.engine.build.build") == "danlu.engine.build" and _owner("torch.nn") is None


def test_no_import_cycles():
    graph = _graph()
    groups = _cycle_groups(graph)
    assert not groups, f"{len(groups)} import cycles:\n" + "\n".join(_describe(g, graph) for g in groups)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{m} line {line}: {name} from {target}" for m in MODULES for target, name, line in _imports(m)
           if name and name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)
