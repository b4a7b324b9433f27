"""No import circles among the project's modules, function-level imports included.

The graph is read from the source with `ast` (nothing is imported): an edge A -> B for every
`import B` / `from B import x` anywhere in A, at module level or inside a function, where B is
a project module (`from pkg import name` counts as pkg.name when that is a module, else pkg).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "tfrecords_builder", "train_tpu", "infer_gpu", "testkit")


def project_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """`{dotted module name: file}` of every `.py` file under the packages."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _owner(name: str, modules) -> str | None:
    """The project module `name` is or lies in (`a.b.c` -> `a.b` when `a.b.c` is no module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """`{module: {project modules it imports}}`, every import statement of the file counted."""
    modules = project_modules(root, packages)
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {_owner(a.name, modules) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    edges.add(full if full in modules else _owner(base, modules))
        edges.discard(None)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each holds a circle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):  # Tarjan; the graph has a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 50 and graph["infer_gpu.engine"]  # the walk found the project
    assert cycles(graph) == []


def test_the_check_sees_a_function_level_circle(tmp_path):
    """The same check on a small tree: a circle closed inside a function, and one through a
    relative `from . import`, are both found; a one-way import is not a circle."""
    pkg = tmp_path / "common"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from common import b\n")
    (pkg / "b.py").write_text("def f():\n    from common.a import g\n")
    (pkg / "c.py").write_text("import common.a\n")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from .x import y\n")
    (pkg / "sub" / "x.py").write_text("from common.sub import z\n")
    graph = import_graph(tmp_path, ("common",))
    assert graph["common.c"] == {"common.a"}
    assert cycles(graph) == [["common.a", "common.b"], ["common.sub", "common.sub.x"]]
