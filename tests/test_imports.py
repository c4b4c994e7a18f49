"""The package's import graph: commands only call down, and no module cycle exists (issue #13).

Every import statement counts, also the ones inside functions (decal imports torch and friends
lazily, and a lazy import closed the cycle commands.metrics -> experiments.report ->
experiments.runner -> commands.metrics).
"""

from __future__ import annotations

import ast
from pathlib import Path

import decal

PACKAGE = Path(decal.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _imported(module: str, is_package: bool, node: ast.stmt, known: set[str]) -> set[str]:
    """The decal modules one import statement reaches (a name imported from a package counts as
    its submodule when one of that name exists)."""
    targets = set()
    if isinstance(node, ast.Import):
        targets = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        targets = {f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names}
    reached = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("decal") and target != module:
            reached.add(target)
    return reached


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = set().union(*(_imported(name, is_package, n, known) for n in ast.walk(tree)
                                    if isinstance(n, (ast.Import, ast.ImportFrom))))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_walker_sees_lazy_imports_and_finds_a_planted_cycle():
    graph = import_graph()
    assert "decal.run_metrics" in graph["decal.experiments.runner"]  # imported inside a function
    assert "decal.run_metrics" in graph["decal.commands.metrics"]
    planted = {name: set(deps) for name, deps in graph.items()}
    planted["decal.metrics"].add("decal.experiments.runner")
    assert any("decal.metrics" in c and "decal.experiments.runner" in c for c in _cycles(planted))


def test_no_import_cycle_in_the_package():
    assert _cycles(import_graph()) == []


def test_only_the_cli_layer_imports_commands():
    offenders = sorted(f"{name} -> {dep}" for name, deps in import_graph().items() for dep in deps
                       if (dep.startswith("decal.commands") or dep == "decal.cli")
                       and not (name.startswith("decal.commands") or name in ("decal.cli", "decal.__main__")))
    assert offenders == []
