"""No import circle inside ``mtp_pretrain/``, read from the source (AST), so every module counts,
whether or not some test imports it. Imports inside functions count too: deferring one side of a
circle into a function only moves the failure to whichever import order runs it first, and hides
a dependency that should go one way. ``if TYPE_CHECKING:`` imports never run and are skipped."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``package_dir`` (a package's name
    stands for its ``__init__.py``)."""
    out = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = list(file.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes that can run: every one except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child] + list(_runtime_imports(child))
                        if isinstance(n, (ast.Import, ast.ImportFrom)))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def import_graph(package_dir: Path) -> dict[str, dict[str, int]]:
    """{module: {imported module of the same package: line of the import}}. ``from p import x``
    is an import of ``p.x`` when that is a module, else of ``p``; a name under a module resolves
    to the module."""
    modules = module_names(package_dir)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1 packages
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def import_circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The shortest circle through each module that lies on one, each circle once (a list of
    modules, the first repeated at the end)."""
    circles: list[list[str]] = []
    for start in sorted(graph):
        parent = {start: start}
        frontier, circle = [start], None
        while frontier and circle is None:  # breadth first: the first way back is a shortest one
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        circle = [start]
                        while v != start:
                            circle.insert(1, v)
                            v = parent[v]
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if circle:
                    break
            frontier = nxt
        if circle and not any(set(circle) == set(c[:-1]) for c in circles):
            circles.append(circle + [start])
    return circles


def describe(circle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


def test_no_import_circle_inside_mtp_pretrain():
    graph = import_graph(REPO / "mtp_pretrain")
    # the graph is the real one: modules and their imports were found
    assert len(graph) > 30 and "mtp_pretrain.checkpoint" in graph["mtp_pretrain.train"]
    assert "mtp_pretrain.model" in graph["mtp_pretrain.interop.hf"]
    circles = import_circles(graph)
    assert not circles, "import circles:\n" + "\n".join(describe(c, graph) for c in circles)


def test_circles_found_through_function_level_and_relative_imports(tmp_path):
    """The check itself: a circle closed by an import inside a function, one through a relative
    import and a package __init__, and none through an ``if TYPE_CHECKING:`` import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    from pkg import a\n",
        "sub/__init__.py": "from .x import X\n",
        "sub/x.py": "from pkg.c import C\nX = 1\n",
        "c.py": "import pkg.sub\nC = 2\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.e import E\n",
        "e.py": "from pkg.d import *\nE = 3\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["pkg.sub"] == {"pkg.sub.x": 1} and graph["pkg.e"] == {"pkg.d": 1} and graph["pkg.d"] == {}
    circles = import_circles(graph)
    assert circles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.c", "pkg.sub", "pkg.sub.x", "pkg.c"]]
    assert describe(circles[0], graph) == "pkg.a (line 1) -> pkg.b (line 2) -> pkg.a"
