"""The import graph of src/lipsync has no cycle (house rule: data flows one way).

Every ``import``/``from ... import`` in every module counts, at module level or inside functions
(a lazy import still ties two modules together); only ``if TYPE_CHECKING:`` blocks are left out,
as they never run. ``from pkg import name`` counts as an import of ``pkg.name`` when that is a
module, else of ``pkg``. The implicit import of a module's parent packages is not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> modules of ``package`` it imports (see the module docstring for the rules)."""
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in files else prefix for a in node.names]
            for target in targets:
                while target and target not in files:  # import a.b.c of a non-module: the module part
                    target = target.rpartition(".")[0]
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path: list[str] = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_src_has_no_import_cycle():
    graph = import_graph(SRC, "lipsync")
    assert len(graph) > 40 and "lipsync.server.routes" in graph
    assert "lipsync.server.runtime" in graph["lipsync.server.routes"]  # the walker sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_server_app_and_routes_do_not_import_each_other():
    graph = import_graph(SRC, "lipsync")
    assert "lipsync.server.app" not in graph["lipsync.server.routes"]
    assert "lipsync.server.routes" not in graph["lipsync.server.runtime"]
    assert "lipsync.server.app" not in graph["lipsync.server.runtime"]


def test_engines_do_not_import_the_shells():
    graph = import_graph(SRC, "lipsync")
    for mod, targets in graph.items():
        if mod.startswith("lipsync.engines"):
            assert not {t for t in targets if t.startswith(("lipsync.server", "lipsync.pipeline", "lipsync.cli"))}, mod


def test_the_checker_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import thing\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.a"] == set()  # TYPE_CHECKING imports never run
    assert find_cycle(graph) is None
    (pkg / "a.py").write_text("from .sub.b import f\n")  # a -> sub.b -> c -> a
    cycle = find_cycle(import_graph(tmp_path, "pkg"))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.sub.b", "pkg.c"}
