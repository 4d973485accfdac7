"""The project's import graph: no cycles (in-function imports count), the installed plugin never imports the
miniature, and the miniature imports at the top of its files."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llava_twist", "scout_data", "playground")
INSTALLED = ("llava_twist", "scout_data")
MINIATURE = "playground.miniature"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "data" not in path.relative_to(REPO / package).parts[:1]:
                found[module_name(path)] = path
    return found


def imported(path: Path, modules: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """The project modules ``path`` imports: (module, statement, at the top of the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(map(id, tree.body))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                found.append((name, node, id(node) in top))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {target for target, _, _ in imported(p, modules)} for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_project_has_no_import_cycle() -> None:
    edges = graph()
    assert "playground.miniature.cli" in edges and "llava_twist.model.modeling" in edges
    assert cycles(edges) == []


def test_the_installed_plugin_never_imports_the_miniature_or_the_playground() -> None:
    edges = graph()
    leaks = {m: sorted(t for t in targets if t.split(".")[0] == "playground")
             for m, targets in edges.items() if m.split(".")[0] in INSTALLED}
    assert {m: t for m, t in leaks.items() if t} == {}


def test_the_miniature_imports_at_the_top_of_its_files() -> None:
    modules = project_modules()
    late = [f"{m}: {target} (line {node.lineno})" for m, p in modules.items() if m.startswith(MINIATURE)
            for target, node, at_top in imported(p, modules) if not at_top]
    assert late == []
