"""Fail when a module of a package imports, directly or through others, a
module that imports it back.

Imports are read from the AST, at any depth: a function-level import is still
a dependency, and so is one inside ``if TYPE_CHECKING:`` (it never runs, but
the module still depends on the other's shape: a cycle there is a cycle in
the design, to be broken with a Protocol in the lower module).
``from pkg import name`` counts as importing ``pkg.name`` when that is a
module, else ``pkg``.

Usage: ``python tests/check_import_cycles.py [PACKAGE_DIR ...]`` (default
``remsh``); exit status 1 and the cycles printed when there are any.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Dict, Iterator, List, Set


def _modules(package_dir: str) -> Dict[str, str]:
    root = os.path.dirname(os.path.abspath(package_dir))
    found: Dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def _imports(tree: ast.AST, module: str, is_package: bool, modules: Dict[str, str]) -> Iterator[str]:
    """Every module of ``modules`` that ``tree`` imports."""

    def visit(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # "from pkg import mod" imports pkg.mod (and runs pkg)
                sub = f"{target}.{alias.name}"
                yield sub if sub in modules else target
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def graph(package_dir: str) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports."""
    modules = _modules(package_dir)
    edges: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges[name] = {t for t in _imports(tree, name, path.endswith("__init__.py"), modules)
                       if t in modules and t != name}
    return edges


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def main(argv: List[str]) -> int:
    status = 0
    for package_dir in argv or ["remsh"]:
        for component in cycles(graph(package_dir)):
            print("import cycle: " + " <-> ".join(component))
            status = 1
    if status == 0:
        print("no import cycles in " + ", ".join(argv or ["remsh"]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
