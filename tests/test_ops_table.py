"""The table of operations (remsh/ops.py) is the one place an operation is
declared: the slave's dispatch, the master's methods, the protocol
reference's summary, the error tags and the "every operation" tests all
follow it, so a place left out fails here."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict

import pytest

from remsh import errors, ops
from remsh.errors import (ERRTAG_CLASSES, Disconnected, InvalidRequestError, RemoteError,
                          UnexpectedError, remote_error)
from remsh.master.slave import Slave
from remsh.slave.server import SlaveServer
from remsh.wire import BoxDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = sorted(ops.OPERATIONS)

#: One call of each operation through the master's API, for the tests that
#: walk every operation; an operation missing here fails
#: test_every_operation_has_a_sample_call.
SAMPLE_CALLS: Dict[str, Callable[[Slave], Any]] = {
    "set_cwd": lambda s: s.set_cwd("."),
    "getenv": lambda s: s.getenv(),
    "mkdir": lambda s: s.mkdir("d"),
    "unlink": lambda s: s.unlink("f"),
    "execute": lambda s: s.execute(["true"]),
    "send": lambda s: s.send(__file__, "copy-of-test"),
    "fetch": lambda s: s.fetch("f", os.devnull + ".never"),
    "remove": lambda s: s.remove("d"),
    "rename": lambda s: s.rename("a", "b"),
    "copy": lambda s: s.copy("a", "b"),
    "stat": lambda s: s.stat("a"),
    "ping": lambda s: s.ping(),
    "send_tree": lambda s: s.send_tree(os.path.dirname(os.path.abspath(__file__)), "tree-copy"),
    "fetch_tree": lambda s: s.fetch_tree("d", os.devnull + ".never"),
    "sync_tree": lambda s: s.sync_tree(os.path.dirname(os.path.abspath(__file__)), "tree-sync"),
    "chmod": lambda s: s.chmod("a", 0o600),
}


def test_every_operation_has_a_sample_call():
    """The sample calls cover exactly the operations of the table."""
    assert sorted(SAMPLE_CALLS) == OPS


def test_slave_dispatch_is_the_table():
    """The slave has a handler for every operation and no handler outside the table."""
    handlers = sorted(name[3:] for name in dir(SlaveServer) if name.startswith("op_"))
    assert handlers == OPS


def test_master_has_a_method_per_operation():
    """Every operation is a public method of the master's Slave."""
    for meth in OPS:
        assert callable(getattr(Slave, meth, None)), meth


def _page(name: str) -> str:
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def test_protocol_summary_is_made_from_the_table():
    """docs/protocol.rst shows the summary that remsh.opsdoc makes from the
    table: every operation once, its keys and its own error tags."""
    from remsh import opsdoc

    assert ".. remsh-operation-summary::" in _page("protocol.rst")
    rows = {re.sub("`", "", r[0]): r for r in opsdoc.summary_rows()}
    assert sorted(rows) == OPS
    for meth, (_, request, reply, tags) in rows.items():
        op = ops.OPERATIONS[meth]
        assert set(re.findall(r"``([a-z-]+)``", tags)) == set(op.errtags), meth
        for key in op.request:
            assert f"``{key.name}" in request, (meth, key.name)
        if not op.conversation:
            for key in op.reply:
                assert key.name in reply, (meth, key.name)
    table = "\n".join(opsdoc.summary_table())
    assert table.count("   * - ``") == len(OPS)


def test_master_methods_are_documented_with_their_signatures():
    """docs/using.rst documents every operation's master method through the
    directive that reads its signature from the code, once, and every
    ``:param X:`` it describes is a parameter the method has."""
    import inspect

    page = _page("using.rst")
    documented = re.findall(r"^    \.\. remsh-method:: (\w+)$", page, re.M)
    assert sorted(documented) == OPS
    hand_written = re.findall(r"^    \.\. method:: (\w+)\(", page, re.M)
    assert not set(hand_written) & set(OPS), "an operation's signature is written by hand"
    blocks = re.split(r"^    \.\. (?:remsh-)?method:: ", page, flags=re.M)[1:]
    for block in blocks:
        name = re.match(r"\w+", block).group(0)
        if name not in ops.OPERATIONS:
            continue
        body_lines = []
        for line in block.splitlines()[1:]:
            if line.strip() and not line.startswith(" " * 8):
                break
            body_lines.append(line)
        body = "\n".join(body_lines)
        params = set(inspect.signature(getattr(Slave, name)).parameters) - {"self"}
        described = set(re.findall(r":param (\w+):", body))
        assert described <= params, (name, described - params)


def test_method_signatures_read_from_the_code():
    """The generated signature is the method's own: parameters in order,
    defaults, the keyword-only marker."""
    from remsh import opsdoc

    assert opsdoc.method_signature(Slave, "fetch") == "fetch(src, dest, *, max_bytes=None, progress=None)"
    assert opsdoc.method_signature(Slave, "ping") == "ping()"
    assert opsdoc.method_signature(Slave, "execute").startswith("execute(args=[], stdout_cb=None")


def test_the_documentation_builds_without_warnings(tmp_path):
    """Sphinx builds docs/ with warnings as errors (the directives that write
    from the code included)."""
    import subprocess
    import sys

    pytest.importorskip("sphinx")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-E", "-W", "--keep-going", "-b", "html",
                           os.path.join(ROOT, "docs"), str(tmp_path / "html")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "html" / "protocol.html", encoding="utf-8") as f:
        html = f.read()
    assert all(f">{meth}<" in html for meth in OPS)


def test_declared_errors_are_in_the_tag_table():
    """Every error class an operation declares is reachable from its tag."""
    for op in ops.OPERATIONS.values():
        for cls in op.all_errors:
            assert ERRTAG_CLASSES[cls.errtag] is cls, (op.meth, cls)


@pytest.mark.parametrize("tag", sorted(ERRTAG_CLASSES))
def test_every_tag_maps_back_to_its_class(tag):
    """The error box the slave makes from an exception turns back into that
    exception's class on the master, with the message intact."""
    cls = ERRTAG_CLASSES[tag]
    box = ops.error_box(cls("what went wrong"))
    back = remote_error(box[b"errtag"].decode(), box[b"error"].decode(), slave="s1", operation="op")
    assert type(back) is cls
    assert back.remote_message == "what went wrong"
    assert str(back).startswith("s1: op: what went wrong")


def test_unknown_tag_is_unexpected():
    """A tag the master does not know becomes UnexpectedError."""
    assert type(remote_error("brand-new", "m")) is UnexpectedError


def test_every_remote_error_class_is_in_the_tag_table():
    """No RemoteError subclass is left out of the tag table."""
    classes = {obj for obj in vars(errors).values()
               if isinstance(obj, type) and issubclass(obj, RemoteError) and obj is not RemoteError}
    assert classes == set(ERRTAG_CLASSES.values())


@pytest.mark.parametrize("meth", OPS)
def test_parse_refuses_missing_required_keys(meth):
    """A request without one of its required keys is invalid."""
    op = ops.OPERATIONS[meth]
    for key in op.request:
        if key.optional or key.prefix:
            continue
        box = {k.wire: b"x" for k in op.request if not k.optional and not k.prefix and k is not key}
        with pytest.raises(InvalidRequestError):
            op.parse(box)


@pytest.mark.parametrize("meth", OPS)
def test_encode_then_parse_round_trips(meth):
    """What the master encodes, the slave parses back to the same values."""
    op = ops.OPERATIONS[meth]
    samples = {"path": b"a/b\xff", "cwd": b"", "int": 7, "mode": 0o640, "bool": True,
               "args": [b"echo", b"x y"], "seconds": 2.5, "bytes": b"v"}
    values = {k.name: ({b"X": b"1"} if k.prefix else samples[k.kind]) for k in op.request}
    (box,) = BoxDecoder().feed(op.encode(**values))
    assert box[b"meth"] == op.wire
    parsed = op.parse(box)
    for key in op.request:
        assert parsed[key.name] == values[key.name], key.name


@pytest.mark.parametrize("meth", OPS)
def test_call_on_disconnected_slave(meth, listener, basedir):
    """Every operation on a disconnected slave raises Disconnected naming slave and operation."""
    slave = listener.start_slave(str(basedir), name="gone")
    slave.close()
    with pytest.raises(Disconnected, match=f"gone: {meth}"):
        SAMPLE_CALLS[meth](slave)


@pytest.mark.parametrize("meth", OPS)
def test_malformed_values_are_invalid_over_the_wire(meth, raw_slave):
    """For every operation, a missing required key and a path key holding NUL
    each get an `invalid` error box from a real slave, which keeps serving."""
    op = ops.OPERATIONS[meth]
    good = {b"meth": op.wire, b"version": b"1"}
    required = [k for k in op.request if not k.optional and not k.prefix]
    for key in required:
        box = dict(good)
        for other in required:
            if other is not key:
                box[other.wire] = b"x"
        reply = raw_slave.request(box)
        assert reply is not None and reply.get(b"errtag") == b"invalid", (key.name, reply)
    for key in op.request:
        if key.kind == "path" and not key.prefix:
            box = dict(good)
            for other in required:
                box[other.wire] = b"x"
            box[key.wire] = b"bad\0path"
            reply = raw_slave.request(box)
            assert reply is not None and reply.get(b"errtag") == b"invalid", (key.name, reply)
    assert raw_slave.ping() == {}


# -- the table drives both ends ------------------------------------------------

def _keys_read(func: Callable[..., Any], seen: set) -> set:
    """The string keys ``func`` reads from its ``args`` parameter
    (``args["k"]``, ``args.get("k")``), following calls that pass ``args``
    on to a function of the same module or of a module it imports."""
    import ast
    import inspect
    import textwrap

    if func in seen:
        return set()
    seen.add(func)
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    keys: set = set()
    module_globals = getattr(func, "__globals__", {})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
                and node.value.id == "args" and isinstance(node.slice, ast.Constant)):
            keys.add(node.slice.value)
        elif isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "get" and isinstance(f.value, ast.Name)
                    and f.value.id == "args" and node.args and isinstance(node.args[0], ast.Constant)):
                keys.add(node.args[0].value)
            elif any(isinstance(a, ast.Name) and a.id == "args" for a in node.args):
                callee: Any = None
                if isinstance(f, ast.Name):
                    callee = module_globals.get(f.id)
                elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                    callee = getattr(module_globals.get(f.value.id), f.attr, None)
                if callable(callee):
                    keys |= _keys_read(callee, seen)
    return keys


@pytest.mark.parametrize("meth", OPS)
def test_handlers_read_exactly_the_declared_keys(meth):
    """The slave's handler (and what it passes the request on to) reads every
    request key the table declares and no other; ``progress`` is read by the
    dispatch for every long operation."""
    op = ops.OPERATIONS[meth]
    handler = getattr(SlaveServer, "op_" + meth)
    read = _keys_read(handler, set())
    declared = {k.name for k in op.request} - {"progress"}
    assert read == declared, (meth, sorted(read), sorted(declared))
    assert op.long == any(k.name == "progress" for k in op.request), meth


@pytest.mark.parametrize("meth", OPS)
def test_every_operation_has_vectors(meth):
    """Every operation of the table has its transcript file in
    docs/vectors/operations, so a second implementation can be checked
    against it."""
    import json

    path = os.path.join(ROOT, "docs", "vectors", "operations", meth + ".json")
    assert os.path.isfile(path), path
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert data["meth"] == meth and data["transcripts"], meth


def test_replies_are_decoded_from_the_table():
    """The master decodes a reply through the operation's declared reply keys:
    values come back typed, a missing or malformed key or a value outside its
    choices is refused."""
    assert ops.STAT.parse_reply({b"result": b"d"}) == {"result": b"d"}
    assert ops.STAT.parse_reply({b"result": b""}) == {"result": b""}
    with pytest.raises(ValueError, match="bad result"):
        ops.STAT.parse_reply({b"result": b"x"})
    with pytest.raises(ValueError, match="no 'result'"):
        ops.STAT.parse_reply({})
    assert ops.SET_CWD.parse_reply({b"cwd": b"/b/d"}) == {"cwd": b"/b/d"}
    with pytest.raises(ValueError, match="cwd"):
        ops.SET_CWD.parse_reply({b"cwd": b"a\0b"})
    env = ops.GETENV.parse_reply({b"env_A": b"1", b"env_": b"x", b"other": b"y"})
    assert env == {"env_": {b"A": b"1"}}
    assert ops.PING.parse_reply({}) == {}



def test_one_error_table_both_ways():
    """Every remsh exception has a tag, and the tag turns back into the class
    (or the ancestor that shares it): the words the command line, the control
    protocol and the job store use come from errors.py alone."""
    classes = {obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, errors.RemshError)}
    for cls in classes:
        if issubclass(cls, RemoteError):
            if cls is not RemoteError:
                assert errors.error_class(cls.errtag) is cls
            continue
        back = errors.error_class(cls.tag)
        assert issubclass(cls, back), (cls, back)
    assert errors.error_tag(errors.PeerTimeout("x")) == "disconnected"
    assert errors.error_tag(errors.NotFoundError("x")) == "notfound"
    assert errors.error_tag(errors.TreeStreamError("x")) == "tree"
    assert errors.error_tag(ValueError("x")) == "error"
    assert errors.error_class("no-such-tag") is errors.RemshError
