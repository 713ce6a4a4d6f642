"""The API pages show what the code takes: every ``.. class::``,
``.. function::`` and ``.. method::`` signature in docs/*.rst is compared
with :func:`inspect.signature` of the object it names (every parameter,
in order, keyword-only ones included), and the attributes people ask for
are documented."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIRECTIVE = re.compile(r"^(\s*)\.\. (class|method|function|classmethod|staticmethod|attribute):: "
                       r"([\w.]+)(?:\((.*)\))?\s*$")

ANY_DIRECTIVE = re.compile(r"^(\s*)\.\. [\w:-]+:: ")


def documented(params: str) -> List[str]:
    """The parameter names of a documented signature (``*args``, ``**kwargs`` marked)."""
    fn = ast.parse(f"def f({params}): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    names += ["*" + a.vararg.arg] if a.vararg else []
    names += [x.arg for x in a.kwonlyargs]
    names += ["**" + a.kwarg.arg] if a.kwarg else []
    return names


def actual(obj: Any) -> List[str]:
    """The parameter names of ``obj``'s signature, the same way (no ``self``)."""
    out = []
    for p in inspect.signature(obj).parameters.values():
        if p.name == "self":
            continue
        prefix = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        out.append(prefix + p.name)
    return out


def entries() -> List[Tuple[str, int, str, str, Optional[str], Any]]:
    """(page, line, kind, name, documented params or None, the class it is in) of every directive."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.rst")):
        cls: Any = None
        cls_indent = -1
        for no, line in enumerate(page.read_text().splitlines(), 1):
            other = ANY_DIRECTIVE.match(line)
            if other and len(other.group(1)) <= cls_indent:
                cls, cls_indent = None, -1  # the class's part of the page has ended
            m = DIRECTIVE.match(line)
            if not m:
                continue
            indent, kind, name, params = len(m.group(1)), m.group(2), m.group(3), m.group(4)
            if kind == "class" and "." in name:
                module, _, attr = name.rpartition(".")
                cls, cls_indent = getattr(importlib.import_module(module), attr), indent
                found.append((page.name, no, kind, name, params, None))
            elif kind == "function" and "." in name:
                found.append((page.name, no, kind, name, params, None))
            elif indent > cls_indent and cls is not None and "." not in name:
                found.append((page.name, no, kind, name, params, cls))
    return found


ENTRIES = entries()


@pytest.mark.parametrize("page,line,kind,name,params,cls", [e for e in ENTRIES if e[4] is not None],
                         ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_a_documented_signature_is_the_codes(page: str, line: int, kind: str, name: str, params: str,
                                             cls: Any) -> None:
    """A documented signature names the object's parameters, all of them, in order."""
    if cls is None:
        module, _, attr = name.rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
    else:
        obj = getattr(cls, name)
    assert documented(params) == actual(obj), f"{page}:{line} {name}"


@pytest.mark.parametrize("page,line,kind,name,params,cls", [e for e in ENTRIES if e[5] is not None],
                         ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_a_documented_member_exists(page: str, line: int, kind: str, name: str, params: Optional[str],
                                    cls: Any) -> None:
    """Every method and attribute documented under a class is one of its members."""
    members = set(dir(cls)) | set(getattr(cls, "__slots__", ()))
    # an instance attribute is set in the class's code: self.NAME
    assert name in members or re.search(rf"self\.{name}\b(:[^=]*)? =", inspect.getsource(cls)), f"{page}:{line} {cls.__name__}.{name}"


@pytest.mark.parametrize("owner,member", [
    ("remsh.master.slave.Slave", "resumable"), ("remsh.master.slave.Slave", "listener"),
    ("remsh.master.slavelistener.tcp.TcpSlaveListener", "expected_slaves"),
    ("remsh.master.fanout.Outcome", "slave"), ("remsh.master.fanout.Outcome", "value"),
    ("remsh.master.fanout.Outcome", "error"), ("remsh.master.fanout.Outcome", "started"),
    ("remsh.master.fanout.Outcome", "finished"), ("remsh.master.fanout.Outcome", "ok"),
    ("remsh.master.fanout.Outcome", "duration"),
])
def test_the_members_people_ask_for_are_documented(owner: str, member: str) -> None:
    """Slave.resumable and .listener, expected_slaves and Outcome's fields are on the API page."""
    assert any(e[5] is not None and f"{e[5].__module__}.{e[5].__name__}" == owner and e[3] == member
               for e in ENTRIES), f"{owner}.{member} is not documented"
