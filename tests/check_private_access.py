"""Fail when a module of a package reads or writes another object's
underscore attribute: ``x._name`` where ``x`` is not ``self`` or ``cls``.

An object's underscore names are its own business; what another module or
class needs of it belongs in its public, typed interface.  Read from the
AST: every attribute access whose name starts with ``_`` counts, unless it
is a dunder (``x.__class__``), its object is the name ``self`` or ``cls``,
or the name is one of :data:`PUBLIC_UNDERSCORE_NAMES` (underscore names
that are the documented public API of the standard library).

Usage: ``python tests/check_private_access.py [PACKAGE_DIR ...]`` (default
``remsh``); exit status 1 and every access printed when there are any.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Iterator, List, Tuple

#: Underscore names that are public API: ``os._exit`` and the methods and
#: fields of ``collections.namedtuple`` classes.
PUBLIC_UNDERSCORE_NAMES = frozenset({"_exit", "_replace", "_asdict", "_fields", "_field_defaults", "_make"})

#: Objects whose underscore attributes are their own.
OWN = frozenset({"self", "cls"})


def private_accesses(source: str, filename: str = "<string>") -> Iterator[Tuple[int, str]]:
    """``(line, expression)`` of every access to another object's
    underscore attribute in ``source``."""
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        if name in PUBLIC_UNDERSCORE_NAMES:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in OWN:
            continue
        yield node.lineno, ast.unparse(node)


def scan(package_dir: str) -> List[str]:
    """``path:line: expression`` of every such access under ``package_dir``."""
    found: List[str] = []
    for dirpath, dirs, files in os.walk(package_dir):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                found.extend(f"{path}:{line}: {expr}" for line, expr in sorted(private_accesses(source, path)))
    return found


def main(argv: List[str]) -> int:
    status = 0
    for package_dir in argv or ["remsh"]:
        for where in scan(package_dir):
            print("private access: " + where)
            status = 1
    if status == 0:
        print("no access to another object's private attributes in " + ", ".join(argv or ["remsh"]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
