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


def _summary_rows() -> Dict[str, str]:
    """meth -> the text of its last column (its own error tags), from the
    simple table under the "Summary" heading of docs/protocol.rst."""
    with open(os.path.join(ROOT, "docs", "protocol.rst"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("Summary")
    border = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("="))
    last_col = lines[border].rindex(" ") + 1
    rows: Dict[str, str] = {}
    last = ""
    for line in lines[border + 3:]:
        if line.startswith("="):
            break
        m = re.match(r"``([a-z_]+)``\s", line)
        if m:
            last = m.group(1)
            rows[last] = ""
        if last:
            rows[last] += " " + line[last_col:]
    return rows


def test_protocol_summary_matches_the_table():
    """docs/protocol.rst's summary lists every operation once, with the error
    tags the table declares for it."""
    rows = _summary_rows()
    assert sorted(rows) == OPS
    for meth, tags in rows.items():
        declared = set(ops.OPERATIONS[meth].errtags)
        documented = set(re.findall(r"``([a-z-]+)``", tags))
        assert documented == declared, (meth, documented, declared)


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
