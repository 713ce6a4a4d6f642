"""The Python examples in README.rst and docs/*.rst compile, and the self-contained ones run as written.

Every Python example is a ``.. code-block:: python`` directive.  An rst
comment on the line before the directive says what kind of example it is
(the marker agreed with this test)::

    .. example: fragment    part of a program: uses names from the text around it
                            (``slave``, ``secret``, ``collection``...); compiled only
    .. example: remote      a complete program that needs a master or slave on
                            another machine (or files in /etc); compiled, names
                            checked, deliberately not run
    (no marker)             a complete program with local slaves only: run by this
                            test, in a scratch directory, as a child process

When the paragraph after a run example ends with ``prints::``, its literal
block is what the example must print, exactly.

A Python example written as a plain ``::`` literal block would escape all of
this: literal blocks that hold Python are compiled too (as fragments), and on
the pages of this test's list they must be code blocks.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.rst"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.rst"))
#: pages whose Python must be in code blocks (docs/protocol.rst has another owner)
STRICT_PAGES = [p for p in PAGES if p != "docs/protocol.rst"]
KINDS = ("run", "fragment", "remote")
#: the longest a self-contained example may take (local slaves only)
RUN_TIMEOUT = 120.0

_MARKER = re.compile(r"^\s*\.\. example: (\S+)\s*$")
_CODE_BLOCK = re.compile(r"^(\s*)\.\. code-block:: python\s*$")


@dataclass
class Example:
    page: str
    line: int              #: 1-based line of the directive or the ``::`` paragraph
    code: str
    kind: str              #: one of KINDS
    literal: bool = False  #: a ``::`` literal block rather than a code block
    expected: Optional[str] = None  #: what a run example must print, when the page says

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: List[str], start: int, parent_indent: int) -> "tuple[str, int]":
    """The body indented deeper than ``parent_indent`` from ``start`` on (blank lines
    first are skipped), dedented; and the index of the first line after it."""
    i = start
    while i < len(lines) and not lines[i].strip():
        i += 1
    body: List[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > parent_indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    if not body:
        return "", i
    depth = min(_indent(b) for b in body if b.strip())
    return "\n".join(b[depth:] for b in body) + "\n", i


def _looks_like_python(code: str) -> bool:
    """Compiles as Python and imports or calls something: not a shell line or a box."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return any(isinstance(n, (ast.Import, ast.ImportFrom, ast.Call)) for n in ast.walk(tree))


def _expected_output(lines: List[str], i: int) -> Optional[str]:
    """The literal block of the paragraph at ``i`` when that paragraph ends with ``prints::``."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    para_start = i
    while i < len(lines) and lines[i].strip():
        i += 1
    paragraph = " ".join(line.strip() for line in lines[para_start:i])
    if not paragraph.endswith("prints::"):
        return None
    text, _ = _block(lines, i, _indent(lines[para_start]))
    return text


def examples(page: str) -> List[Example]:
    """Every Python example of ``page``: code blocks, and literal blocks that hold Python."""
    lines = (ROOT / page).read_text().splitlines()
    found: List[Example] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _CODE_BLOCK.match(line)
        if m:
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            marker = _MARKER.match(lines[j]) if j >= 0 else None
            kind = marker.group(1) if marker else "run"
            code, end = _block(lines, i + 1, _indent(line))
            expected = _expected_output(lines, end) if kind == "run" else None
            found.append(Example(page, i + 1, code, kind, expected=expected))
            i = end
            continue
        if line.rstrip().endswith("::") and not line.lstrip().startswith(".. "):
            code, end = _block(lines, i + 1, _indent(line))
            if _looks_like_python(code):
                found.append(Example(page, i + 1, code, "fragment", literal=True))
            i = end
            continue
        i += 1
    return found


ALL = [ex for page in PAGES for ex in examples(page)]


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
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


def test_the_pages_have_examples_of_every_kind() -> None:
    """The parser finds the examples: the README's, and at least one of each kind."""
    assert [ex for ex in ALL if ex.page == "README.rst"], "no Python examples found in README.rst"
    assert {ex.kind for ex in ALL} >= set(KINDS)


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.id)
def test_python_examples_compile(ex: Example) -> None:
    """Every Python example is valid Python and carries a known marker."""
    assert ex.kind in KINDS, f"{ex.id}: unknown marker '.. example: {ex.kind}'"
    compile(ex.code, ex.id, "exec")


@pytest.mark.parametrize("page", STRICT_PAGES)
def test_python_examples_are_python_code_blocks(page: str) -> None:
    """A Python example is a ``.. code-block:: python`` (highlighted, marked), never a bare ``::`` block."""
    literal = [ex.id for ex in examples(page) if ex.literal]
    assert literal == [], f"Python in '::' literal blocks, make them '.. code-block:: python': {literal}"


@pytest.mark.parametrize("ex", [ex for ex in ALL if ex.kind != "fragment"], ids=lambda ex: ex.id)
def test_complete_examples_use_only_names_they_define_or_import(ex: Example) -> None:
    """Every name a complete example uses is imported or defined in it (README's TCP example once lacked sys)."""
    assert _undefined_names(ex.code) == set(), ex.code


@pytest.mark.parametrize("page", PAGES)
def test_examples_read_secrets_the_way_remsh_does(page: str) -> None:
    """No example strips a secret; a complete one that needs a secret reads it with read_secret_file."""
    for ex in examples(page):
        if "secret" not in ex.code:
            continue
        assert ".strip()" not in ex.code and "rstrip(" not in ex.code, ex.id
        if ex.kind != "fragment":
            assert "read_secret_file(" in ex.code, ex.id


@pytest.mark.parametrize("ex", [ex for ex in ALL if ex.kind == "run"], ids=lambda ex: ex.id)
def test_self_contained_examples_run_as_written(ex: Example, tmp_path: Path) -> None:
    """A self-contained example runs in a fresh directory as a child process, exits 0 and prints what the page says."""
    work = tmp_path / "cwd"
    tmp = tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT))
    env.pop("REMSH_SECRET", None)
    proc = subprocess.run([sys.executable, "-c", ex.code], cwd=work, env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, f"{ex.id} exited {proc.returncode}\n{out}\n{err}"
    if ex.expected is not None:
        assert out == ex.expected, f"{ex.id} printed:\n{out}"
