"""The package's shape: data flows one way, ops -> nn -> knockoffs / scales -> prune -> run -> cli,
with train, data and models serving them; no module imports one that imports it back, not even
lazily inside a function. Checked on the source (AST), so a cycle fails here before it can fail
at import time in some order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "scop_ext"

# A module may import from its own group and from groups of lower rank only.
RANK = {"ops": 0, "nn": 1, "train": 2, "data": 2, "models": 3, "plots": 3, "knockoffs": 4, "scales": 4, "prune": 5,
        "export": 6, "run": 7, "cli": 8}
# The package root re-exports and keeps the old paths alive; it sits above everything.
EXEMPT = {"scop_ext", "scop_ext.__main__", "scop_ext._moved"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every scop_ext module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in _walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return {m for m in found if m in modules and m != name}


def _walk(node):
    """ast.walk, less the blocks under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
            continue
        yield from _walk(child)


def _group(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_group_has_a_rank(graph):
    groups = {_group(m) for m in graph if m not in EXEMPT}
    assert groups <= set(RANK), f"modules outside the layering: {sorted(groups - set(RANK))}"


def test_nothing_imports_a_higher_layer(graph):
    upward = sorted(f"{m} imports {d}" for m, deps in graph.items() if m not in EXEMPT for d in deps
                    if d not in EXEMPT and _group(d) != _group(m) and RANK[_group(d)] >= RANK[_group(m)])
    assert not upward, "\n".join(upward)


def test_no_import_cycle(graph):
    # Tarjan's strongly connected components over the module graph, package __init__s left out
    # (a package re-exporting its own modules is not a cycle).
    nodes = {m: {d for d in deps if d not in EXEMPT and not _is_package_of(d, m)} for m, deps in graph.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in nodes.get(v, ()):
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
                cycles.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def _is_package_of(package: str, module: str) -> bool:
    return module.startswith(package + ".") and (ROOT.parent / package.replace(".", "/") / "__init__.py").exists()


def test_the_top_level_stays_small():
    top = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 8, top
