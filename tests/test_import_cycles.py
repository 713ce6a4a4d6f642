"""The import-cycle check that `make test` runs: remsh has no cycle, and the
check finds one when there is one (behind TYPE_CHECKING too)."""

from __future__ import annotations

import os

from tests.check_import_cycles import cycles, graph

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package(tmp_path, files):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / name).write_text(text)
    return str(pkg)


def test_remsh_has_no_import_cycle():
    """No module of remsh imports one that imports it back."""
    assert cycles(graph(os.path.join(ROOT, "remsh"))) == []


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """a imports b at the top, b imports a inside a function: still a cycle."""
    pkg = _package(tmp_path, {"a.py": "from pkg import b\n",
                              "b.py": "def f():\n    from pkg.a import x\n"})
    assert cycles(graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_type_checking_imports_count(tmp_path):
    """An import that only type checkers see still closes a cycle."""
    pkg = _package(tmp_path, {"a.py": "import pkg.b\n",
                              "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"})
    assert cycles(graph(pkg)) == [["pkg.a", "pkg.b"]]


def test_master_tree_imports_no_slave_module():
    """The master's tree transfers (a lower layer) import nothing of remsh.slave."""
    edges = graph(os.path.join(ROOT, "remsh"))
    assert sorted(m for m in edges["remsh.master.tree"] if m.startswith("remsh.slave")) == []


def test_modules_stay_under_800_lines():
    """Every module of the package is under 800 lines: a module that grows
    past it is split where its parts show."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "remsh"
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) >= 800}
    assert long == {}
