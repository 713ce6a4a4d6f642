"""Write the protocol test vectors of this directory from the reference code.

Run from the repository root (``python docs/vectors/make_vectors.py``); the
files it writes are checked into git and read by ``tests/test_vectors.py``
and by anyone checking another implementation (see the "Test vectors"
section of ``docs/protocol.rst`` for the format).

- ``boxes.json``: the codec: boxes and their exact bytes, input a decoder
  must refuse (with the error and where it is detected), boxes an encoder
  must refuse.  Built from the format rules and checked against
  :mod:`remsh.wire` here.
- ``handshake.json``: both proofs for fixed secrets, nonces and names, and
  the byte streams of a whole set-up.
- ``operations/<meth>.json``: transcripts of every operation.  Each is *run
  here against a real slave child* and the slave's replies are recorded as it
  sent them; values that depend on the run (the base directory, error texts)
  are marked, not recorded.  A transcript is kept only if it ends in step (a
  ``ping`` right after it gets exactly the empty box), so the recording has
  no output left over.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from remsh.handshake import master_proof, slave_proof  # noqa: E402
from remsh.wire import (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_KEYS, BoxDecoder, WireError,  # noqa: E402
                        encode_box)
from tests.util import RawSlave, box_pairs, environment  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = 1
#: Byte strings longer than twice this are written with runs of at least this
#: many equal bytes compressed (see spec()).
RUN = 32
#: A fixed box is given whole in ``hex`` when its encoding is at most this long.
HEX_MAX = 4096

Bytesish = Union[bytes, str]
Pairs = List[Tuple[bytes, bytes]]


def b(v: Bytesish) -> bytes:
    return v.encode("utf-8", "surrogateescape") if isinstance(v, str) else v


def pairs_of(*items: Tuple[Bytesish, Bytesish]) -> Pairs:
    return [(b(k), b(v)) for k, v in items]


# -- byte strings in JSON -----------------------------------------------------


def spec(data: bytes) -> Any:
    """A byte string as the vectors write it: lower-case hex, or for long
    repetitive data a list of parts, each hex or ``{"repeat": HEX, "times": N}``."""
    if len(data) <= RUN * 2:
        return data.hex()
    parts: List[Any] = []
    literal = bytearray()
    i = 0
    while i < len(data):
        j = i
        while j < len(data) and data[j] == data[i]:
            j += 1
        if j - i >= RUN:
            if literal:
                parts.append(literal.hex())
                literal = bytearray()
            parts.append({"repeat": data[i:i + 1].hex(), "times": j - i})
        else:
            literal += data[i:j]
        i = j
    if literal:
        parts.append(literal.hex())
    return parts[0] if len(parts) == 1 and isinstance(parts[0], str) else parts


def unspec(s: Any) -> bytes:
    """The inverse of :func:`spec`."""
    if isinstance(s, str):
        return bytes.fromhex(s)
    if isinstance(s, dict):
        times: int = s["times"]
        return bytes.fromhex(str(s["repeat"])) * times
    return b"".join(unspec(p) for p in s)


def show_value(v: bytes) -> str:
    """A value for people: printable ASCII as it is (``\\n`` and ``\\0``
    escaped), anything else as hex or a byte count."""
    if len(v) <= 100 and all(0x20 <= c <= 0x7E or c in (0x00, 0x0A) for c in v):
        return v.decode("ascii").replace("\n", "\\n").replace("\0", "\\0")
    if len(v) <= 16:
        return "<" + v.hex(" ") + ">"
    return f"<{len(v)} bytes>"


def show(pairs: Sequence[Tuple[bytes, Any]]) -> str:
    """A box for people: ``{key: value, ...}``."""
    items = []
    for k, v in pairs:
        text = v if isinstance(v, str) else show_value(v)
        items.append(f"{show_value(k)}: {text}")
    return "{" + ", ".join(items) + "}"


def enc(pairs: Pairs) -> bytes:
    """A box encoded from the format's rule (pairs in the order given)."""
    return b"".join(len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v for k, v in pairs) + b"\0\0"


# -- boxes.json -----------------------------------------------------------------


def _most_keys() -> Pairs:
    return [(b"k%04d" % i, b"") for i in range(DEFAULT_MAX_KEYS)]


def _most_bytes() -> Pairs:
    """16 keys whose box is exactly DEFAULT_MAX_BOX_BYTES bytes on the wire."""
    pairs = [(b"k%02d" % i, bytes([0x61 + i]) * 65535) for i in range(15)]
    used = sum(2 + len(k) + 2 + len(v) for k, v in pairs) + 2
    last = DEFAULT_MAX_BOX_BYTES - used - (2 + 3 + 2)
    pairs.append((b"k15", b"\x70" * last))
    return pairs


def codec_vectors() -> Dict[str, Any]:
    """The codec vectors, each checked against remsh.wire."""
    defaults = {"max_keys": DEFAULT_MAX_KEYS, "max_box_bytes": DEFAULT_MAX_BOX_BYTES}
    small = {"max_keys": 2, "max_box_bytes": 10}
    valid: List[Tuple[str, str, List[Pairs], Dict[str, int]]] = [
        ("width", "the example of the reference page", [pairs_of(("width", "12cm"))], defaults),
        ("empty-box", "no keys: just the end marker", [[]], defaults),
        ("ping-request", "a request", [pairs_of(("meth", "ping"), ("version", "1"))], defaults),
        ("zero-length-value", "an empty value is allowed", [pairs_of(("k", ""))], defaults),
        ("binary-key-and-value", "keys and values are arbitrary bytes, NUL included",
         [[(b"\x00\xff", b"\x00\x00\x00"), (b"\xc3\xa9", b"\xff")]], defaults),
        ("key-order-is-free", "keys in any order: the decoded box is a set of pairs",
         [pairs_of(("b", "2"), ("a", "1"))], defaults),
        ("longest-key", "a key of 255 bytes", [[(b"k" * 255, b"v")]], defaults),
        ("longest-value", "a value of 65535 bytes", [[(b"data", b"\xab" * 65535)]], defaults),
        ("most-keys", "1024 keys: the most a decoder takes at its default setting",
         [_most_keys()], defaults),
        ("most-bytes", "a box of exactly 1048576 bytes on the wire (every length prefix and the "
         "end marker counted): the most a decoder takes at its default setting",
         [_most_bytes()], defaults),
        ("several-boxes", "a stream of three boxes", [pairs_of(("a", "1")), [], pairs_of(("b", ""))],
         defaults),
        ("custom-limit-bytes", "a box of exactly 10 bytes under a limit of 10",
         [pairs_of(("ab", "cd"))], small),
        ("custom-limit-keys", "two keys under a limit of 2",
         [pairs_of(("a", ""), ("b", ""))], {"max_keys": 2, "max_box_bytes": 100}),
    ]
    out_valid = []
    for name, desc, boxes, limits in valid:
        data = b"".join(enc(p) for p in boxes)
        assert data == b"".join(encode_box(dict(p)) for p in boxes), name
        dec = BoxDecoder(**limits)
        assert dec.feed(data) == [dict(p) for p in boxes], name
        dec.close()
        out_valid.append({"name": name, "description": desc, "decoder": limits,
                          "boxes": [[[k.hex(), spec(v)] for k, v in p] for p in boxes],
                          "bytes": spec(data)})

    most = enc(_most_keys())[:-2]
    full = _most_bytes()
    big_prefix = enc(full[:15])[:-2] + b"\x00\x03k15" + (len(full[15][1]) + 1).to_bytes(2, "big")
    invalid: List[Tuple[str, str, bytes, str, bool, Dict[str, int]]] = [
        ("key-length-256", "a key length of 256 (over 255), refused at its prefix",
         b"\x01\x00", "key-too-long", False, defaults),
        ("key-length-65535", "a key length of 65535, refused at its prefix",
         b"\xff\xff", "key-too-long", False, defaults),
        ("key-length-256-late", "an over-long key after a good pair",
         enc(pairs_of(("a", "1")))[:-2] + b"\x01\x00", "key-too-long", False, defaults),
        ("duplicate-key", "the same key twice in one box, refused once the second key is read",
         enc(pairs_of(("a", "1")))[:-2] + b"\x00\x01a", "duplicate-key", False, defaults),
        ("too-many-keys", "the length prefix of a 1025th key, refused at once",
         most + b"\x00\x05", "too-many-keys", False, defaults),
        ("too-many-bytes", "a value length prefix that would make the box 1048577 bytes "
         "(counting the end marker still to come), refused at once",
         big_prefix, "box-too-large", False, defaults),
        ("custom-too-many-keys", "a third key under a limit of 2",
         enc(pairs_of(("a", ""), ("b", "")))[:-2] + b"\x00\x01", "too-many-keys", False,
         {"max_keys": 2, "max_box_bytes": 100}),
        ("custom-too-many-bytes", "a box of 11 bytes under a limit of 10, refused at the value's prefix",
         b"\x00\x02ab\x00\x03", "box-too-large", False, small),
        ("custom-key-too-many-bytes", "a key whose own prefix, bytes, value prefix and the end "
         "marker pass the limit, refused at the key's prefix",
         b"\x00\x09", "box-too-large", False, small),
        ("truncated-in-length", "the stream ends after one byte of a length prefix",
         b"\x00", "truncated", True, defaults),
        ("truncated-in-key", "the stream ends inside a key",
         b"\x00\x04me", "truncated", True, defaults),
        ("truncated-before-value", "the stream ends between a key and its value",
         b"\x00\x04meth", "truncated", True, defaults),
        ("truncated-in-value", "the stream ends inside a value",
         b"\x00\x04meth\x00\x04pi", "truncated", True, defaults),
        ("truncated-before-end", "every pair complete but no end marker",
         enc(pairs_of(("meth", "ping")))[:-2], "truncated", True, defaults),
        ("truncated-after-a-box", "a whole box, then the stream ends inside the next",
         b"\x00\x00\x00\x01a", "truncated", True, defaults),
    ]
    out_invalid = []
    for name, desc, data, kind, at_eof, limits in invalid:
        detected = _detected_at(data, at_eof, limits)
        assert detected == len(data), (name, detected, len(data))
        out_invalid.append({"name": name, "description": desc, "decoder": limits, "bytes": spec(data),
                            "error": kind, "eof": at_eof})
    unencodable = [
        ("empty-key", "a key of 0 bytes (it would read as the end of the box)", [(b"", b"v")], "key-length"),
        ("key-of-256", "a key of 256 bytes", [(b"k" * 256, b"v")], "key-length"),
        ("value-of-65536", "a value of 65536 bytes (2 bytes cannot hold its length)",
         [(b"k", b"\x00" * 65536)], "value-length"),
    ]
    out_unenc = []
    for name, desc, pairs, kind in unencodable:
        try:
            encode_box(dict(pairs))
        except ValueError:
            pass
        else:
            raise AssertionError(f"{name}: encode_box took it")
        out_unenc.append({"name": name, "description": desc, "pairs": [[k.hex(), spec(v)] for k, v in pairs],
                          "error": kind})
    return {"format": FORMAT, "valid": out_valid, "invalid": out_invalid, "unencodable": out_unenc}


def _detected_at(data: bytes, at_eof: bool, limits: Dict[str, int]) -> int:
    """How many bytes the reference decoder takes before it raises (fed byte by byte)."""
    dec = BoxDecoder(**limits)
    for i in range(len(data)):
        try:
            dec.feed(data[i:i + 1])
        except WireError:
            assert not at_eof
            return i + 1
    assert at_eof
    try:
        dec.close()
    except WireError:
        return len(data)
    raise AssertionError("not refused")


# -- handshake.json --------------------------------------------------------------


def handshake_vectors() -> Dict[str, Any]:
    """Proofs for fixed inputs, and a whole set-up made of them."""
    cases = [
        ("text-secret", "s3cret".encode(), bytes(range(32)), bytes(range(32, 64)), b"b1"),
        ("binary-secret-utf8-name", bytes(range(255, 223, -1)), b"\xa5" * 32, b"\x5a" * 32,
         "büild-01".encode("utf-8")),
    ]
    proofs = []
    for name, secret, n_m, n_s, slave in cases:
        proofs.append({
            "name": name, "secret": secret.hex(), "nonce_m": n_m.hex(), "nonce_s": n_s.hex(),
            "slave_name": slave.hex(),
            "slave_proof": slave_proof(secret, n_m, n_s, slave).hex(),
            "master_proof": master_proof(secret, n_s, n_m, slave).hex(),
        })
    secret, n_m, n_s, slave = cases[0][1:]
    register = pairs_of(("register", slave), ("version", "1"), ("nonce", n_s), ("hostname", "b1.example.com"),
                        ("platform", "Linux-6.1-x86_64"), ("python", "3.11.7"), ("basedir", "/srv/build"),
                        ("remsh", "0.1.0"), ("proof", slave_proof(secret, n_m, n_s, slave)))
    stream: List[Tuple[str, str, Union[bytes, Pairs]]] = [
        ("master", "greeting", b"REMSH-M\n"),
        ("slave", "greeting", b"REMSH-S\n"),
        ("master", "hello", pairs_of(("hello", "remsh"), ("version", "1"), ("nonce", n_m))),
        ("slave", "register", register),
        ("master", "registered", pairs_of(("registered", slave), ("proof", master_proof(secret, n_s, n_m, slave)))),
        ("master", "first request", pairs_of(("meth", "ping"), ("version", "1"))),
        ("slave", "its reply", []),
    ]
    refused = pairs_of(("error", "authentication failed"), ("errtag", "auth-failed"))
    return {
        "format": FORMAT,
        "proofs": proofs,
        "exchange": {
            "description": "slave b1 with the secret, nonces and name of the first proof vector; "
                           "the slave's descriptive keys (hostname to remsh) are examples",
            "proof_case": cases[0][0],
            "steps": [_plain_step(who, what, data) for who, what, data in stream],
        },
        "refusal": {"description": "what the master sends for every failed registration, then closes; "
                                   "the error text is free, the errtag is not",
                    "pairs": [[k.hex(), spec(v)] for k, v in refused]},
    }


def _plain_step(who: str, what: str, data: Union[bytes, Pairs]) -> Dict[str, Any]:
    if isinstance(data, bytes):
        return {"from": who, "what": what, "raw": data.hex()}
    return {"from": who, "what": what, "show": show(data), "pairs": [[k.hex(), spec(v)] for k, v in data],
            "hex": enc(data).hex()}


# -- operations/<meth>.json ------------------------------------------------------


class T:
    """One transcript: master boxes to send, and where a slave box is read."""

    def __init__(self, name: str, description: str, steps: Sequence[Any], *,
                 setup: Sequence[Dict[str, Any]] = (), check: Sequence[Dict[str, Any]] = (),
                 env: Optional[Dict[bytes, Optional[bytes]]] = None, subset: bool = False) -> None:
        self.name = name
        self.description = description
        self.steps = list(steps)
        self.setup = list(setup)
        self.check = list(check)
        self.env = env or {}
        self.subset = subset


def M(*items: Tuple[Bytesish, Bytesish]) -> Tuple[str, Pairs]:
    """A box the master sends."""
    return ("master", pairs_of(*items))


#: Read the slave's next box.
S = ("slave", None)


def req(meth: str, *items: Tuple[Bytesish, Bytesish]) -> Tuple[str, Pairs]:
    return M(("meth", meth), ("version", "1"), *items)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def args(*argv: str) -> Tuple[str, bytes]:
    return ("args", b"\0".join(a.encode() for a in argv))


def W(path: str, data: bytes) -> Dict[str, Any]:
    """Set-up: write a file."""
    return {"write": path, "data": spec(data)}


def F(path: str, data: bytes, **more: Any) -> Dict[str, Any]:
    """Check: a file holds exactly ``data``."""
    return {"file": path, "data": spec(data), **more}


BIG = b"\x61" * 65535 + b"\x62"
#: A fixed modification time (ns) for the tree transcripts.
MTIME = "1700000000000000000"

TRANSCRIPTS: Dict[str, List[T]] = {
    "common": [
        T("unknown-meth", "an operation the slave does not know", [req("frobnicate"), S]),
        T("meth-is-case-sensitive", "PING is not ping", [req("PING"), S]),
        T("no-meth", "a box without meth that is no execute-control box", [M(("hello", "x")), S]),
        T("version-01", "the operation version is compared as an integer: 01 is 1",
          [M(("meth", "ping"), ("version", "01")), S]),
        T("version-too-new", "version 2", [M(("meth", "ping"), ("version", "2")), S]),
        T("version-unsupported", "version 0", [M(("meth", "ping"), ("version", "0")), S]),
        T("version-negative", "version -1 is older than 1", [M(("meth", "ping"), ("version", "-1")), S]),
        T("version-not-a-number", "version 1.0", [M(("meth", "ping"), ("version", "1.0")), S]),
        T("version-plus", "version +1 (no sign but -)", [M(("meth", "ping"), ("version", "+1")), S]),
        T("version-missing", "no version key", [M(("meth", "ping")), S]),
        T("unknown-meth-before-version", "an unknown meth is reported before a bad version",
          [M(("meth", "frobnicate"), ("version", "x")), S]),
        T("late-control-boxes", "execute-control boxes between operations get no answer",
          [M(("interrupt", "y")), M(("stream", "stdin"), ("data", "late")),
           M(("stream", "stdin"), ("eof", "y")), req("ping"), S]),
        T("unknown-keys-ignored", "a request's unknown keys are ignored",
          [req("ping", ("colour", "blue")), S]),
    ],
    "ping": [T("ping", "the cheapest round trip", [req("ping"), S])],
    "set_cwd": [
        T("into-and-back", "relative, unchanged (empty), parent, back to the base directory (absent)",
          [req("set_cwd", ("cwd", "sub/deeper")), S, req("set_cwd", ("cwd", "")), S,
           req("set_cwd", ("cwd", "..")), S, req("set_cwd"), S],
          setup=[{"mkdir": "sub/deeper"}]),
        T("notfound", "not an existing directory (the current directory stays)",
          [req("set_cwd", ("cwd", "missing")), S, req("set_cwd", ("cwd", "")), S]),
        T("file-is-notfound", "a file is not a directory",
          [req("set_cwd", ("cwd", "f")), S], setup=[W("f", b"")]),
        T("nul", "a NUL byte in cwd", [req("set_cwd", ("cwd", "a\0b")), S]),
        T("relative-to-current", "a relative path is against the current directory",
          [req("set_cwd", ("cwd", "a")), S, req("set_cwd", ("cwd", "b")), S],
          setup=[{"mkdir": "a/b"}]),
    ],
    "getenv": [
        T("getenv", "the reply holds every variable; the slave was started with these ones set "
          "(and REMSH_VECTOR_GONE unset)",
          [req("getenv"), S],
          env={b"REMSH_VECTOR_A": b"alpha", b"REMSH_VECTOR_EMPTY": b"", b"remsh_vector_lower": b"case kept",
               b"REMSH_VECTOR_BINARY": b"\xff\xfe", b"REMSH_VECTOR_GONE": None},
          subset=True),
    ],
    "mkdir": [
        T("with-parents", "like mkdir -p", [req("mkdir", ("dir", "a/b/c")), S], check=[{"dir": "a/b/c"}]),
        T("exists", "an existing directory is fine", [req("mkdir", ("dir", "a")), S], setup=[{"mkdir": "a"}]),
        T("file-in-the-way", "a file where the directory should be",
          [req("mkdir", ("dir", "f")), S, req("mkdir", ("dir", "f/sub")), S], setup=[W("f", b"")]),
        T("missing-key", "no dir key", [req("mkdir"), S]),
        T("empty-path", "an empty path", [req("mkdir", ("dir", "")), S]),
    ],
    "unlink": [
        T("file", "one file", [req("unlink", ("file", "f")), S], setup=[W("f", b"x")], check=[{"absent": "f"}]),
        T("symlink-not-followed", "a symbolic link goes, its target stays",
          [req("unlink", ("file", "link")), S], setup=[W("f", b"x"), {"symlink": "link", "target": "f"}],
          check=[{"absent": "link"}, F("f", b"x")]),
        T("notfound", "missing file", [req("unlink", ("file", "missing")), S]),
        T("directory", "a directory is not a file", [req("unlink", ("file", "d")), S], setup=[{"mkdir": "d"}],
          check=[{"dir": "d"}]),
        T("nul", "a NUL byte in the path", [req("unlink", ("file", "a\0b")), S]),
    ],
    "remove": [
        T("tree", "a whole tree", [req("remove", ("path", "t")), S],
          setup=[{"mkdir": "t/a/b"}, W("t/a/b/f", b"x")], check=[{"absent": "t"}]),
        T("missing", "a missing path is fine", [req("remove", ("path", "missing")), S]),
        T("symlink-not-followed", "a link to a directory goes, the directory stays",
          [req("remove", ("path", "link")), S],
          setup=[{"mkdir": "d"}, W("d/f", b"x"), {"symlink": "link", "target": "d"}],
          check=[{"absent": "link"}, F("d/f", b"x")]),
        T("empty-path", "an empty path", [req("remove", ("path", "")), S]),
    ],
    "rename": [
        T("rename", "a file", [req("rename", ("src", "a"), ("dest", "b")), S], setup=[W("a", b"x")],
          check=[{"absent": "a"}, F("b", b"x")]),
        T("notfound", "missing source", [req("rename", ("src", "missing"), ("dest", "b")), S]),
        T("fileexists", "the destination exists", [req("rename", ("src", "a"), ("dest", "b")), S],
          setup=[W("a", b"1"), W("b", b"2")], check=[F("a", b"1"), F("b", b"2")]),
        T("failed", "a directory into itself", [req("rename", ("src", "d"), ("dest", "d/inside")), S],
          setup=[{"mkdir": "d"}], check=[{"dir": "d"}]),
        T("missing-dest", "no dest key", [req("rename", ("src", "a")), S]),
    ],
    "copy": [
        T("copy", "a file's data", [req("copy", ("src", "a"), ("dest", "b")), S], setup=[W("a", b"data")],
          check=[F("a", b"data"), F("b", b"data"), {"no_partial_files": "."}]),
        T("notfound", "missing source", [req("copy", ("src", "missing"), ("dest", "b")), S], check=[{"absent": "b"}]),
        T("fileexists", "the destination exists", [req("copy", ("src", "a"), ("dest", "b")), S],
          setup=[W("a", b"1"), W("b", b"2")], check=[F("b", b"2")]),
        T("directory", "a directory is refused", [req("copy", ("src", "d"), ("dest", "b")), S],
          setup=[{"mkdir": "d"}], check=[{"absent": "b"}]),
    ],
    "stat": [
        T("directory", "d", [req("stat", ("path", "d")), S], setup=[{"mkdir": "d"}]),
        T("file", "f", [req("stat", ("path", "f")), S], setup=[W("f", b"")]),
        T("missing", "empty result", [req("stat", ("path", "missing")), S]),
        T("dangling-symlink", "links are followed", [req("stat", ("path", "link")), S],
          setup=[{"symlink": "link", "target": "missing"}]),
        T("through-a-file", "a path through a non-directory does not exist", [req("stat", ("path", "f/x")), S],
          setup=[W("f", b"")]),
        T("symlink-loop", "a path that cannot be examined", [req("stat", ("path", "loop")), S],
          setup=[{"symlink": "loop", "target": "loop"}]),
    ],
    "chmod": [
        T("file", "mode 384 is 0600", [req("chmod", ("path", "f"), ("mode", "384")), S], setup=[W("f", b"")],
          check=[F("f", b"", mode=384)]),
        T("missing", "notfound", [req("chmod", ("path", "missing"), ("mode", "384")), S]),
        T("symlink", "a link is refused, never followed", [req("chmod", ("path", "link"), ("mode", "511")), S],
          setup=[W("f", b""), {"symlink": "link", "target": "f"}]),
    ],
    "send": [
        T("with-digest-and-mode", "two data boxes and the digest; mode 420 is 0644",
          [req("send", ("dest", "out"), ("mode", "420")), S, M(("data", "hello ")), M(("data", "world")),
           M(("sha256", sha(b"hello world"))), S],
          check=[F("out", b"hello world", mode=420), {"no_partial_files": "."}]),
        T("full-data-box", "a data box of 65535 bytes and one of 1",
          [req("send", ("dest", "out")), S, M(("data", BIG[:65535])), M(("data", BIG[65535:])),
           M(("sha256", sha(BIG))), S], check=[F("out", BIG)]),
        T("no-digest", "the end box is empty",
          [req("send", ("dest", "out")), S, M(("data", "x")), M(), S], check=[F("out", b"x")]),
        T("empty-file", "no data box at all",
          [req("send", ("dest", "out")), S, M(("sha256", sha(b""))), S], check=[F("out", b"")]),
        T("upper-case-digest", "a receiver accepts upper-case hex",
          [req("send", ("dest", "out")), S, M(("data", "x")), M(("sha256", sha(b"x").upper())), S],
          check=[F("out", b"x")]),
        T("digest-mismatch", "the file is discarded",
          [req("send", ("dest", "out")), S, M(("data", "x")), M(("sha256", sha(b"y"))), S],
          check=[{"absent": "out"}, {"no_partial_files": "."}]),
        T("abort", "the master gives up",
          [req("send", ("dest", "out")), S, M(("data", "x")), M(("sha256", "-"), ("abort", "could not read")), S],
          check=[{"absent": "out"}, {"no_partial_files": "."}]),
        T("late-control-box-skipped", "an execute-control box among the data boxes is not data",
          [req("send", ("dest", "out")), S, M(("data", "a")), M(("stream", "stdin"), ("data", "zz")),
           M(("data", "b")), M(("sha256", sha(b"ab"))), S], check=[F("out", b"ab")]),
        T("fileexists", "dest exists", [req("send", ("dest", "out")), S], setup=[W("out", b"old")],
          check=[F("out", b"old")]),
        T("openfailed", "the directory of dest does not exist", [req("send", ("dest", "missing/out")), S]),
        T("bad-mode", "mode is not a decimal integer", [req("send", ("dest", "out"), ("mode", "0644x")), S]),
        T("mode-out-of-range", "mode over 4095", [req("send", ("dest", "out"), ("mode", "4096")), S]),
    ],
    "fetch": [
        T("small", "one data box and the digest", [req("fetch", ("src", "f")), S, S],
          setup=[W("f", b"hello\n")]),
        T("two-data-boxes", "65536 bytes: a full data box and one of 1 byte", [req("fetch", ("src", "f")), S, S, S],
          setup=[W("f", BIG)]),
        T("empty", "no data box", [req("fetch", ("src", "f")), S], setup=[W("f", b"")]),
        T("notfound", "missing file", [req("fetch", ("src", "missing")), S]),
        T("openfailed", "a directory", [req("fetch", ("src", "d")), S], setup=[{"mkdir": "d"}]),
        T("missing-key", "no src key", [req("fetch"), S]),
        T("interrupt", "the master stops the transfer (its max_bytes): an interrupt already there when "
          "the slave starts stops it before any data", [req("fetch", ("src", "f")), M(("interrupt", "y")), S],
          setup=[W("f", BIG)]),
        T("late-interrupt", "an interrupt that crosses the end box gets no answer",
          [req("fetch", ("src", "f")), S, S, M(("interrupt", "y"))], setup=[W("f", b"hello\n")]),
    ],
    "execute": [
        T("stdout", "output, then the exit status", [req("execute", args("sh", "-c", "printf hi"),
                                                         ("want_stdout", "y"), ("want_stderr", "y")), S, S, S]),
        T("want-flags-default-to-y", "without want_stdout/want_stderr both streams are sent",
          [req("execute", args("sh", "-c", "printf out; read x; printf err >&2"), ("want_stdin", "y")), S, S,
           M(("stream", "stdin"), ("data", "\n")), S, S]),
        T("both-streams", "stdout, stderr (ordered by the command waiting for input) and exit status 3",
          [req("execute", args("sh", "-c", "printf out; read x; printf err >&2; exit 3"), ("want_stdout", "y"),
               ("want_stderr", "y"), ("want_stdin", "y")), S, S, M(("stream", "stdin"), ("data", "\n")), S, S]),
        T("discarded-output", "want_stdout n: stdout goes to /dev/null",
          [req("execute", args("sh", "-c", "printf out; exit 7"), ("want_stdout", "n"), ("want_stderr", "n")), S, S]),
        T("stdin", "stdin boxes, then end of stdin",
          [req("execute", args("cat"), ("want_stdin", "y")), S, M(("stream", "stdin"), ("data", "hello")), S,
           M(("stream", "stdin"), ("data", "world")), S, M(("stream", "stdin"), ("eof", "y")), S]),
        T("stdin-data-and-eof", "one stdin box with data and eof: the data is written, then stdin closed",
          [req("execute", args("cat"), ("want_stdin", "y")), S, M(("stream", "stdin"), ("data", "abc"), ("eof", "y")),
           S, S]),
        T("stdin-not-wanted", "stdin boxes for a command without want_stdin are dropped (its stdin is /dev/null)",
          [req("execute", args("sh", "-c", "read x; printf $?")), M(("stream", "stdin"), ("data", "x\n")), S, S, S]),
        T("request-during-execute", "a box that is not an execute-control box is ignored while a command runs",
          [req("execute", args("cat"), ("want_stdin", "y")), S, req("ping"), M(("stream", "stdin"), ("data", "x")), S,
           M(("stream", "stdin"), ("eof", "y")), S]),
        T("interrupt", "the process group is killed: status -9",
          [req("execute", args("sh", "-c", "printf started; exec sleep 60")), S, S, M(("interrupt", "y")), S]),
        T("killed-by-signal", "a process killed by signal 15 reports -15",
          [req("execute", args("sh", "-c", "kill -TERM $$")), S, S]),
        T("timeout", "the time limit kills the process group",
          [req("execute", args("sleep", "60"), ("timeout", "0.2")), S, S]),
        T("timeout-exponent", "a timeout written with an exponent (1e-05, as Python's repr writes it)",
          [req("execute", args("sleep", "60"), ("timeout", "1e-05")), S, S]),
        T("timeout-decimal", "timeout 30.0; the command ends first",
          [req("execute", args("true"), ("timeout", "30.0")), S, S]),
        T("timeout-zero", "timeout 0 is refused", [req("execute", args("true"), ("timeout", "0")), S]),
        T("timeout-inf", "timeout inf is refused", [req("execute", args("true"), ("timeout", "inf")), S]),
        T("timeout-nan", "timeout nan is refused", [req("execute", args("true"), ("timeout", "nan")), S]),
        T("timeout-word", "timeout abc is refused", [req("execute", args("true"), ("timeout", "abc")), S]),
        T("env", "variables set over the slave's environment; the name after env_ keeps its case",
          [req("execute", args("sh", "-c", 'printf "%s|%s|%s" "$REMSH_V" "$remsh_v" "$PATH"'),
               ("env_REMSH_V", "upper"), ("env_remsh_v", "lower"), ("env_PATH", "/usr/bin:/bin")), S, S, S]),
        T("unset", "unset_NAME removes a variable",
          [req("execute", args("sh", "-c", 'printf %s "${REMSH_VECTOR_UNSET-gone}"'),
               ("unset_REMSH_VECTOR_UNSET", "")), S, S, S], env={b"REMSH_VECTOR_UNSET": b"present"}),
        T("unset-wins", "with env_NAME and unset_NAME for one name the variable is removed",
          [req("execute", args("sh", "-c", 'printf %s "${REMSH_X-gone}"'), ("env_REMSH_X", "set"),
               ("unset_REMSH_X", "")), S, S, S]),
        T("unset-wins-in-any-key-order", "the same with the keys the other way round",
          [req("execute", args("sh", "-c", 'printf %s "${REMSH_X-gone}"'), ("unset_REMSH_X", ""),
               ("env_REMSH_X", "set")), S, S, S]),
        T("bad-env-name", "a variable name with =", [req("execute", args("true"), ("env_A=B", "x")), S]),
        T("cwd", "a command runs in the current directory",
          [req("execute", args("pwd")), S, S, S], setup=[{"mkdir": "sub"}]),
        T("cwd-key", "the cwd key, relative to the current directory",
          [req("execute", args("pwd"), ("cwd", "sub")), S, S, S], setup=[{"mkdir": "sub"}]),
        T("execfailed", "no such program", [req("execute", args("/nonexistent/remsh-vector")), S]),
        T("execfailed-cwd", "no such cwd", [req("execute", args("true"), ("cwd", "missing")), S]),
        T("missing-args", "no args key", [req("execute"), S]),
        T("empty-args", "an empty argument list", [req("execute", ("args", "")), S]),
        T("bad-flag", "want_stdout must be y or n", [req("execute", args("true"), ("want_stdout", "yes")), S]),
    ],
    "send_tree": [
        T("small", "a directory holding a file, a symbolic link and an empty directory, then the end box",
          [req("send_tree", ("dest", "out")), M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("t", "f"), ("n", "hello"), ("m", "420"), ("mt", MTIME), ("d", "hello\n"), ("h", sha(b"hello\n"))),
           M(("t", "l"), ("n", "link"), ("l", "hello"), ("mt", MTIME)),
           M(("t", "d"), ("n", "empty"), ("m", "448"), ("mt", MTIME)), M(("t", "u")), M(("t", "u")),
           M(("end", "y")), S],
          check=[F("out/hello", b"hello\n", mode=420), {"dir": "out/empty"}, {"no_partial_files": "."}]),
        T("file-in-three-boxes", "a file's data over several boxes; the box with h ends it",
          [req("send_tree", ("dest", "out")), M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("t", "f"), ("n", "f"), ("m", "420"), ("mt", MTIME), ("d", "ab")), M(("d", "cd")),
           M(("d", "e"), ("h", sha(b"abcde"))), M(("t", "u")), M(("end", "y")), S],
          check=[F("out/f", b"abcde")]),
        T("fileexists", "dest exists: the error box comes at once, the slave reads up to the end box",
          [req("send_tree", ("dest", "out")), S, M(("t", "d"), ("m", "493"), ("mt", MTIME)), M(("t", "u")),
           M(("end", "y"))], setup=[W("out", b"old")], check=[F("out", b"old"), {"no_partial_files": "."}]),
        T("notfound", "the directory of dest does not exist",
          [req("send_tree", ("dest", "missing/out")), S, M(("t", "d"), ("m", "493"), ("mt", MTIME)), M(("t", "u")),
           M(("end", "y"))]),
        T("digest-mismatch", "nothing is kept",
          [req("send_tree", ("dest", "out")), M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("t", "f"), ("n", "f"), ("m", "420"), ("mt", MTIME), ("d", "x"), ("h", sha(b"y"))), S,
           M(("t", "u")), M(("end", "y"))], check=[{"absent": "out"}, {"no_partial_files": "."}]),
        T("abort", "the master gives up: nothing is kept",
          [req("send_tree", ("dest", "out")), M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("abort", "could not read a file")), S], check=[{"absent": "out"}, {"no_partial_files": "."}]),
        T("bad-name", "a name with a slash is refused (invalid)",
          [req("send_tree", ("dest", "out")), M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("t", "l"), ("n", "a/b"), ("l", "x"), ("mt", MTIME)), S, M(("t", "u")), M(("end", "y"))],
          check=[{"absent": "out"}]),
    ],
    "fetch_tree": [
        T("notfound", "missing directory", [req("fetch_tree", ("src", "missing")), S]),
        T("openfailed", "a file is not a directory", [req("fetch_tree", ("src", "f")), S], setup=[W("f", b"")]),
    ],
    "sync_tree": [
        T("into-missing", "dest does not exist: an empty manifest, then the whole tree",
          [req("sync_tree", ("dest", "out")), S, M(("t", "d"), ("m", "493"), ("mt", MTIME)),
           M(("t", "f"), ("n", "f"), ("m", "420"), ("mt", MTIME), ("d", "new"), ("h", sha(b"new"))),
           M(("t", "u")), M(("end", "y")), S], check=[F("out/f", b"new", mode=420)]),
        T("notfound", "the directory of dest does not exist", [req("sync_tree", ("dest", "missing/out")), S]),
        T("failed", "dest is a file", [req("sync_tree", ("dest", "f")), S], setup=[W("f", b"")]),
    ],
}

#: Error tags an operation can return that no transcript shows, and why.
NOT_SHOWN: Dict[str, Dict[str, str]] = {
    "common": {
        "unexpected": "only a failure the slave did not foresee (a bug) produces it",
        "denied": "the slave's policy refused the operation; the slave of these transcripts "
                  "runs without a policy",
    },
    "fetch": {"failed": "a read error after the file was opened (e.g. EIO) cannot be provoked portably"},
    "fetch_tree": {"failed": "needs a FIFO, socket or device in the tree, or an unreadable file, which the "
                             "set-up actions cannot make; tests/test_tree.py checks them"},
    "remove": {"failed": "needs a tree its user cannot remove, and the tests may run as root"},
    "getenv": {"failed": "needs a slave whose environment is larger than one box (more than 1022 "
                         "variables); tests/test_vectors.py checks it against a live slave"},
}


def _as_step(who: str, raw_pairs: Pairs, basedir: bytes, env_names: Optional[List[bytes]]) -> Dict[str, Any]:
    """A box of a transcript, with the slave's variable values marked."""
    pairs: List[List[Any]] = []
    shown: List[Tuple[bytes, Any]] = []
    fixed = True
    for k, v in raw_pairs:
        if who == "slave" and env_names is not None:
            if not (k.startswith(b"env_") and k[4:] in env_names):
                continue
        value: Any
        if who == "slave" and k == b"error":
            text = v.decode("utf-8", "replace").replace(os.fsdecode(basedir), "<basedir>")
            text = re.sub(r"\.[0-9a-f]+\.remsh-part", ".<random>.remsh-part", text)
            value = {"any": True, "example": text}
            shown.append((k, f"<text: {text}>"))
            fixed = False
        elif who == "slave" and basedir and v.startswith(basedir):
            value = {"var": "basedir", "suffix": v[len(basedir):].hex()}
            shown.append((k, "<basedir>" + show_value(v[len(basedir):])))
            fixed = False
        else:
            value = spec(v)
            shown.append((k, v))
        pairs.append([k.hex(), value])
    step: Dict[str, Any] = {"from": who, "show": show(shown), "pairs": pairs}
    if env_names is not None and who == "slave":
        step["subset"] = True
        step["show"] = step["show"][:-1] + ", ...}"
    elif fixed:
        data = enc(raw_pairs)
        if len(data) <= HEX_MAX:
            step["hex"] = data.hex()
    return step


def _setup(base: str, actions: Sequence[Dict[str, Any]]) -> None:
    for a in actions:
        if "mkdir" in a:
            os.makedirs(os.path.join(base, a["mkdir"]))
        elif "write" in a:
            with open(os.path.join(base, a["write"]), "wb") as f:
                f.write(unspec(a["data"]))
        elif "symlink" in a:
            os.symlink(a["target"], os.path.join(base, a["symlink"]))
        else:
            raise ValueError(a)


def record(t: T) -> Dict[str, Any]:
    """Run ``t`` against a real slave child and return its JSON form."""
    tmp = tempfile.mkdtemp(prefix="remsh-vectors-")
    base = os.path.join(tmp, "base")
    os.mkdir(base)
    try:
        _setup(base, t.setup)
        with environment(t.env):
            raw = RawSlave(base, name="vectors")
        try:
            basedir = os.fsencode(raw.registration.info["basedir"])
            reader = raw.box_reader()
            steps = []
            env_names = [k for k, v in t.env.items() if v is not None] if t.subset else None
            outgoing = b""  # the master's consecutive boxes, sent in one write
            for who, pairs in t.steps:
                if who == "master":
                    outgoing += enc(pairs)
                    steps.append(_as_step("master", pairs, basedir, None))
                else:
                    if outgoing:
                        raw.send_raw(outgoing)
                        outgoing = b""
                    got = reader.read()
                    assert got is not None, t.name
                    steps.append(_as_step("slave", box_pairs(got), basedir, env_names))
            raw.send_raw(outgoing + enc(pairs_of(("meth", "ping"), ("version", "1"))))
            assert reader.read() == b"\0\0" and not reader.pending(), f"{t.name}: not in step at the end"
        finally:
            raw.close()
    finally:
        shutil.rmtree(tmp)
    out: Dict[str, Any] = {"name": t.name, "description": t.description}
    if t.env:
        out["slave_env"] = {k.hex(): (None if v is None else v.hex()) for k, v in t.env.items()}
    if t.setup:
        out["setup"] = t.setup
    out["steps"] = steps
    if t.check:
        out["check"] = t.check
    return out


def write(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main() -> None:
    write(os.path.join(HERE, "boxes.json"), codec_vectors())
    write(os.path.join(HERE, "handshake.json"), handshake_vectors())
    for meth, transcripts in TRANSCRIPTS.items():
        write(os.path.join(HERE, "operations", f"{meth}.json"),
              {"format": FORMAT, "meth": meth, "tags_not_shown": NOT_SHOWN.get(meth, {}),
               "transcripts": [record(t) for t in transcripts]})


if __name__ == "__main__":
    main()
