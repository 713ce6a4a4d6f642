"""The Python examples in README.rst and docs/quickstart.rst can run as written."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path
from typing import List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.rst", "docs/quickstart.rst"]


def _python_blocks(text: str) -> List[str]:
    """The bodies of the ``.. code-block:: python`` directives of a reST page."""
    blocks = []
    for m in re.finditer(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M):
        lines = [line[4:] for line in m.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def _undefined_names(code: str) -> Set[str]:
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("page", PAGES)
def test_python_examples_use_only_names_they_define_or_import(page):
    """Every name a Python example uses is imported or defined in it (README's TCP example once lacked sys)."""
    blocks = _python_blocks((ROOT / page).read_text())
    assert blocks, f"no Python examples found in {page}"
    for code in blocks:
        assert _undefined_names(code) == set(), code


@pytest.mark.parametrize("page", PAGES)
def test_examples_read_secrets_the_way_remsh_does(page):
    """No example strips a secret with .strip() or rstrip(); they use remsh.secretfile.read_secret_file."""
    text = (ROOT / page).read_text()
    secret_blocks = [b for b in _python_blocks(text) if "secret" in b]
    assert secret_blocks
    for code in secret_blocks:
        assert ".strip()" not in code and "rstrip(" not in code, code
        assert "read_secret_file(" in code, code
