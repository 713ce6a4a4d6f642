"""The protocol test vectors of docs/vectors hold for the reference code.

Every vector file is loaded: the codec vectors against :mod:`remsh.wire`
(encoder and decoder), the proofs against :mod:`remsh.handshake`, and every
operation transcript replayed byte for byte against a real slave child with
nothing of the master library between the test and the wire.  The vectors
are read with the rules that ``docs/protocol.rst`` gives implementers (the
reader here is written from them, not taken from the generator), and the
byte and transcript examples marked in that page are checked against the
vectors.
"""

from __future__ import annotations

import glob
import hashlib
import hmac
import importlib.util
import json
import os
import re
import stat
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest

from remsh.handshake import MASTER_GREETING, SLAVE_GREETING, master_proof, slave_proof
from remsh.transports.local import spawn_local_slave, stop_child
from remsh.wire import BoxDecoder, WireError, encode_box
from tests.util import RawBoxReader, RawSlave, box_pairs, environment, temp_files

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "docs", "vectors")
PROTOCOL_RST = os.path.join(ROOT, "docs", "protocol.rst")

Pairs = List[Tuple[bytes, bytes]]


# -- the vector format (docs/protocol.rst, "Test vectors") ----------------------


def load(name: str) -> Dict[str, Any]:
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        data: Dict[str, Any] = json.load(f)
    assert data["format"] == 1
    return data


def data_of(spec: Any) -> bytes:
    """A byte string: hex, or a list of parts (hex, or ``{repeat, times}``)."""
    if isinstance(spec, str):
        assert spec == spec.lower(), "hex is lower case"
        return bytes.fromhex(spec)
    if isinstance(spec, dict):
        times: int = spec["times"]
        return bytes.fromhex(str(spec["repeat"])) * times
    return b"".join(data_of(part) for part in spec)


def frame(pairs: Pairs) -> bytes:
    """A box from the format's rule alone (not the codec under test)."""
    out = [len(k).to_bytes(2, "big") + k + len(v).to_bytes(2, "big") + v for k, v in pairs]
    return b"".join(out) + b"\x00\x00"


def fixed_pairs(pairs: List[List[Any]]) -> Pairs:
    return [(bytes.fromhex(k), data_of(v)) for k, v in pairs]


def operation_files() -> List[str]:
    return sorted(glob.glob(os.path.join(VECTORS, "operations", "*.json")))


def all_transcripts() -> List[Tuple[str, Dict[str, Any]]]:
    """(meth, transcript) for every transcript of every operation file."""
    out = []
    for path in operation_files():
        data = load(os.path.relpath(path, VECTORS))
        out += [(data["meth"], t) for t in data["transcripts"]]
    return out


# -- codec ----------------------------------------------------------------------

BOXES = load("boxes.json")
#: Words of WireError's message for each kind of invalid input.
ERROR_WORDS = {
    "key-too-long": "key length",
    "duplicate-key": "duplicate key",
    "too-many-keys": "more than",
    "box-too-large": "larger than",
    "truncated": "truncated",
}


def chunkings(data: bytes) -> Iterator[List[bytes]]:
    """The input whole, in small odd pieces, and (when short) byte by byte."""
    yield [data]
    step = 7 if len(data) < 100_000 else 4099
    yield [data[i:i + step] for i in range(0, len(data), step)]
    if len(data) <= 20_000:
        yield [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("vector", BOXES["valid"], ids=lambda v: v["name"])
def test_valid_box_vectors(vector: Dict[str, Any]) -> None:
    """encode_box writes each valid vector's exact bytes and BoxDecoder reads
    them back, whole or in pieces, under the vector's limits."""
    boxes = [fixed_pairs(p) for p in vector["boxes"]]
    data = data_of(vector["bytes"])
    assert b"".join(frame(p) for p in boxes) == data
    assert b"".join(encode_box(dict(p)) for p in boxes) == data
    for pieces in chunkings(data):
        decoder = BoxDecoder(**vector["decoder"])
        got = []
        for piece in pieces:
            got.extend(decoder.feed(piece))
        decoder.close()
        assert got == [dict(p) for p in boxes]


@pytest.mark.parametrize("vector", BOXES["invalid"], ids=lambda v: v["name"])
def test_invalid_box_vectors(vector: Dict[str, Any]) -> None:
    """BoxDecoder refuses each invalid vector with WireError, at the point the
    vector says: its last byte, or the end of the stream."""
    data = data_of(vector["bytes"])
    word = ERROR_WORDS[vector["error"]]
    decoder = BoxDecoder(**vector["decoder"])
    if vector["eof"]:
        decoder.feed(data)
        with pytest.raises(WireError, match=word):
            decoder.close()
        return
    decoder.feed(data[:-1])  # a limit is enforced at the prefix that breaks it, not before
    with pytest.raises(WireError, match=word):
        decoder.feed(data[-1:])
    with pytest.raises(WireError):
        decoder.feed(b"\x00\x00")  # and the decoder stays failed
    with pytest.raises(WireError, match=word):
        BoxDecoder(**vector["decoder"]).feed(data)


@pytest.mark.parametrize("vector", BOXES["unencodable"], ids=lambda v: v["name"])
def test_unencodable_box_vectors(vector: Dict[str, Any]) -> None:
    """encode_box refuses keys and values the format cannot carry."""
    with pytest.raises(ValueError):
        encode_box(dict(fixed_pairs(vector["pairs"])))


# -- handshake --------------------------------------------------------------------

HANDSHAKE = load("handshake.json")


@pytest.mark.parametrize("vector", HANDSHAKE["proofs"], ids=lambda v: v["name"])
def test_proof_vectors(vector: Dict[str, Any]) -> None:
    """Both proofs of remsh.handshake match the vectors, and so does the
    Python example of the reference page, run as written."""
    k, n_m, n_s, name = (bytes.fromhex(vector[x]) for x in ("secret", "nonce_m", "nonce_s", "slave_name"))
    assert slave_proof(k, n_m, n_s, name).hex() == vector["slave_proof"]
    assert master_proof(k, n_s, n_m, name).hex() == vector["master_proof"]
    assert hmac.new(k, b"remsh-v1-slave\0" + n_m + n_s + name, hashlib.sha256).hexdigest() == vector["slave_proof"]
    scope: Dict[str, Any] = {"K": k, "n_m": n_m, "n_s": n_s, "name": name}
    exec(_python_snippet_of_the_page(), scope)  # noqa: S102 - the page's own example
    assert scope["slave_proof"].hex() == vector["slave_proof"]
    assert scope["master_proof"].hex() == vector["master_proof"]


def _python_snippet_of_the_page() -> str:
    m = re.search(r"In Python:(?::|\n\n\.\. example: fragment\n\n\.\. code-block:: python)\n\n((?:    .*\n|\n)+)",
                  _page())
    assert m, "the proofs' Python example is missing from protocol.rst"
    return "\n".join(line[4:] for line in m.group(1).splitlines())


def test_handshake_exchange_vector() -> None:
    """The exchange's boxes are framed as their pairs say, and its proofs and
    nonces are those of the proof vector it names."""
    case = {p["name"]: p for p in HANDSHAKE["proofs"]}[HANDSHAKE["exchange"]["proof_case"]]
    boxes: Dict[str, Dict[bytes, bytes]] = {}
    for step in HANDSHAKE["exchange"]["steps"]:
        if "raw" in step:
            continue
        pairs = fixed_pairs(step["pairs"])
        assert frame(pairs).hex() == step["hex"]
        assert encode_box(dict(pairs)).hex() == step["hex"]
        boxes[step["what"]] = dict(pairs)
    raws = [bytes.fromhex(s["raw"]) for s in HANDSHAKE["exchange"]["steps"] if "raw" in s]
    assert raws == [MASTER_GREETING, SLAVE_GREETING]
    assert boxes["hello"][b"nonce"].hex() == case["nonce_m"]
    assert boxes["register"][b"nonce"].hex() == case["nonce_s"]
    assert boxes["register"][b"proof"].hex() == case["slave_proof"]
    assert boxes["registered"][b"proof"].hex() == case["master_proof"]
    assert boxes["registered"][b"registered"] == boxes["register"][b"register"] == bytes.fromhex(case["slave_name"])
    refusal = dict(fixed_pairs(HANDSHAKE["refusal"]["pairs"]))
    assert refusal[b"errtag"] == b"auth-failed"


def test_handshake_bytes_with_a_real_slave(tmp_path: Any) -> None:
    """A slave child (no secret) answers the vector's greeting and hello
    bytes with a register box of the documented form, accepts the
    registered box and serves a ping."""
    base = tmp_path / "base"
    base.mkdir()
    proc, stream = spawn_local_slave(str(base), "b1")
    try:
        hello = next(s for s in HANDSHAKE["exchange"]["steps"] if s.get("what") == "hello")
        stream.send_all(MASTER_GREETING + bytes.fromhex(hello["hex"]))
        greeting = b""
        while len(greeting) < len(SLAVE_GREETING):
            chunk = stream.recv(len(SLAVE_GREETING) - len(greeting), 10.0)
            assert chunk, "slave closed before its greeting"
            greeting += chunk
        assert greeting == SLAVE_GREETING
        reader = RawBoxReader(stream)
        register = reader.read()
        assert register is not None
        pairs = box_pairs(register)
        keys = [k for k, _ in pairs]
        assert len(set(keys)) == len(keys)
        box = dict(pairs)
        assert box[b"register"] == b"b1" and box[b"version"] == b"1" and len(box[b"nonce"]) == 32
        assert {b"hostname", b"platform", b"python", b"basedir", b"remsh"} <= set(box)
        assert b"proof" not in box  # no secret
        stream.send_all(frame([(b"registered", b"b1")]) + frame([(b"meth", b"ping"), (b"version", b"1")]))
        assert reader.read() == b"\x00\x00"
    finally:
        stream.close()
        stop_child(proc)


# -- operation transcripts ----------------------------------------------------------


def _setup(base: str, actions: List[Dict[str, Any]]) -> None:
    for a in actions:
        if "mkdir" in a:
            os.makedirs(os.path.join(base, a["mkdir"]))
        elif "write" in a:
            with open(os.path.join(base, a["write"]), "wb") as f:
                f.write(data_of(a["data"]))
        elif "symlink" in a:
            os.symlink(a["target"], os.path.join(base, a["symlink"]))
        else:
            raise AssertionError(f"unknown set-up action {a}")


def _check(base: str, actions: List[Dict[str, Any]]) -> None:
    for a in actions:
        if "file" in a:
            path = os.path.join(base, a["file"])
            with open(path, "rb") as f:
                assert f.read() == data_of(a["data"]), a["file"]
            if "mode" in a:
                assert stat.S_IMODE(os.stat(path).st_mode) == a["mode"], a["file"]
        elif "dir" in a:
            assert os.path.isdir(os.path.join(base, a["dir"])), a["dir"]
        elif "absent" in a:
            assert not os.path.lexists(os.path.join(base, a["absent"])), a["absent"]
        elif "no_partial_files" in a:
            assert temp_files(os.path.join(base, a["no_partial_files"])) == []
        else:
            raise AssertionError(f"unknown check {a}")


def _value(spec: Any, basedir: bytes) -> Optional[bytes]:
    """The value a slave must send (``None``: any value)."""
    if isinstance(spec, dict) and "any" in spec:
        return None
    if isinstance(spec, dict) and "var" in spec:
        assert spec["var"] == "basedir"
        return basedir + bytes.fromhex(spec["suffix"])
    return data_of(spec)


def expect_box(step: Dict[str, Any], raw: bytes, basedir: bytes) -> None:
    """Compare a box the slave sent with the transcript's step, byte for byte
    except for the values the step marks as variable."""
    got = box_pairs(raw)
    want = [(bytes.fromhex(k), _value(v, basedir)) for k, v in step["pairs"]]
    if step.get("subset"):
        assert all(k.startswith(b"env_") for k, _ in got), "getenv keys are env_NAME"
        for k, v in want:
            assert v is not None
            assert frame([(k, v)])[:-2] in raw, f"{k!r}: {v!r} not in the reply"
        return
    assert [k for k, _ in got] == [k for k, _ in want], f"keys {got} != {want}"
    for (k, gv), (_, wv) in zip(got, want):
        if wv is None:
            gv.decode("utf-8")  # free text, but text
        else:
            assert gv == wv, f"{k!r}: {gv[:200]!r} != {wv[:200]!r}"
    if "hex" in step:
        assert raw.hex() == step["hex"]


@pytest.mark.parametrize("meth,transcript", [pytest.param(m, t, id=f"{m}-{t['name']}")
                                             for m, t in all_transcripts()])
def test_operation_transcript(meth: str, transcript: Dict[str, Any], tmp_path: Any) -> None:
    """A real slave child sends exactly the transcript's bytes for the
    master's boxes, ends in step, and leaves the file system as stated."""
    base = str(tmp_path / "base")
    os.mkdir(base)
    _setup(base, transcript.get("setup", []))
    env = {bytes.fromhex(k): (None if v is None else bytes.fromhex(v))
           for k, v in transcript.get("slave_env", {}).items()}
    with environment(env):
        raw = RawSlave(base, name="vectors")
    try:
        basedir = os.fsencode(raw.registration.info["basedir"])
        assert basedir == os.fsencode(os.path.abspath(base))
        reader = raw.box_reader()
        # the master's consecutive boxes go out in one write, so that a box
        # sent "with" the request (an interrupt) is there when the slave
        # reads the request, whatever the scheduling
        outgoing = b""
        for step in transcript["steps"]:
            if step["from"] == "master":
                pairs = fixed_pairs(step["pairs"])
                if "hex" in step:
                    assert frame(pairs).hex() == step["hex"]
                outgoing += frame(pairs)
            else:
                if outgoing:
                    raw.send_raw(outgoing)
                    outgoing = b""
                got = reader.read()
                assert got is not None, "slave closed the connection"
                expect_box(step, got, basedir)
        raw.send_raw(outgoing + frame([(b"meth", b"ping"), (b"version", b"1")]))
        assert reader.read() == b"\x00\x00", "a box the transcript does not have"
        assert reader.pending() == b""
    finally:
        raw.close()
    _check(base, transcript.get("check", []))


# -- the reference page against the vectors ---------------------------------------


def _page() -> str:
    with open(PROTOCOL_RST, encoding="utf-8") as f:
        return f.read()


def _marked_blocks(marker: str) -> List[Tuple[List[str], List[str]]]:
    """(marker arguments, lines of the literal block after it) for every
    ``.. <marker>: ARGS`` comment of the page."""
    lines = _page().splitlines()
    found = []
    for i, line in enumerate(lines):
        m = re.match(rf"\.\. {marker}: (.+)$", line)
        if not m:
            continue
        j = i + 1
        while not lines[j].startswith("    "):  # the directive or "::" line, blank lines
            j += 1
        block = []
        while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
            if lines[j].strip():
                block.append(lines[j].strip())
            j += 1
        found.append((m.group(1).split(), block))
    return found


def _bytes_of_line(line: str) -> bytes:
    """``00 04 'meth' ...``: hex byte pairs and quoted ASCII."""
    out = b""
    for token in re.findall(r"'[^']*'|(?<![0-9A-Za-z])[0-9a-fA-F]{2}(?![0-9A-Za-z])", line):
        out += token[1:-1].encode("ascii") if token.startswith("'") else bytes.fromhex(token)
    return out


def test_page_byte_examples_match_vectors() -> None:
    """Every byte example marked in protocol.rst is the vector it names."""
    marked = _marked_blocks("vector-bytes")
    assert len(marked) >= 3
    valid = {v["name"]: v for v in BOXES["valid"]}
    for (name,), block in marked:
        assert _bytes_of_line(block[0]) == data_of(valid[name]["bytes"]), name


def test_page_transcript_examples_match_vectors() -> None:
    """Every exchange marked in protocol.rst is the transcript it names."""
    marked = _marked_blocks("vector-transcript")
    assert len(marked) >= 5
    by_name = {(m, t["name"]): t for m, t in all_transcripts()}
    for (meth, name), block in marked:
        steps = by_name[(meth, name)]["steps"]
        shown = [tuple(part.strip() for part in line.split(":", 1)) for line in block]
        assert shown == [(s["from"], s["show"]) for s in steps], f"{meth} {name}"


def _summary_table() -> Dict[str, List[str]]:
    """meth -> its own error tags, from the summary the page shows (written
    by remsh.opsdoc from the operation table)."""
    assert ".. remsh-operation-summary::" in _page()
    from remsh import opsdoc
    return {re.sub(r"`", "", meth): re.findall(r"``([a-z-]+)``", tags)
            for meth, _, _, tags in opsdoc.summary_rows()}


def _tags_of(meth: str) -> Tuple[Set[str], Set[str]]:
    """The error tags the transcripts of ``meth`` show, and those declared not shown."""
    data = load(f"operations/{meth}.json")
    shown = set()
    for t in data["transcripts"]:
        for step in t["steps"]:
            for k, v in step["pairs"]:
                if bytes.fromhex(k) == b"errtag":
                    shown.add(data_of(v).decode("ascii"))
    return shown, set(data["tags_not_shown"])


def test_every_error_tag_has_a_transcript() -> None:
    """Each operation of the summary table has a vector file, and each error
    tag it can return is shown by a transcript or listed as not shown."""
    table = _summary_table()
    assert "ping" in table and "execute" in table and len(table) >= 12
    files = {os.path.basename(p)[:-5] for p in operation_files()}
    assert set(table) <= files
    page = _page()
    common = page[page.index("Any operation may fail"):page.index("A slave checks in this order")]
    listed = set(re.findall(r"^``([a-z-]+)``\s{2,}", common, re.M))
    shown, not_shown = _tags_of("common")
    assert {"invalid-meth", "invalid", "denied"} <= listed
    assert listed <= shown | not_shown
    for meth, own in table.items():
        shown, not_shown = _tags_of(meth)
        missing = set(own) - shown - not_shown
        assert not missing, f"{meth}: no transcript shows {sorted(missing)}"


def test_vectors_are_what_the_generator_writes() -> None:
    """The checked-in codec and handshake vectors are the generator's output
    (the transcripts are checked by replaying them instead)."""
    spec = importlib.util.spec_from_file_location("make_vectors", os.path.join(VECTORS, "make_vectors.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.codec_vectors() == BOXES
    assert module.handshake_vectors() == HANDSHAKE


# -- limits the protocol reference requires of both ends ----------------------------


def test_getenv_reply_fits_the_default_limits(tmp_path: Any) -> None:
    """getenv from a slave with 1100 variables still decodes at the default limits."""
    base = tmp_path / "base"
    base.mkdir()
    with environment({b"REMSH_MANY_%04d" % i: b"x" for i in range(1100)}):
        raw = RawSlave(str(base))
    try:
        reader = raw.box_reader()
        raw.send_raw(frame([(b"meth", b"getenv"), (b"version", b"1")]))
        reply = reader.read()
        assert reply is not None
        assert len(BoxDecoder().feed(reply)) == 1
    finally:
        raw.close()


def test_execute_refuses_a_request_over_the_slaves_limits(slave: Any) -> None:
    """execute with more variables than one box may hold raises UsageError and keeps the slave."""
    from remsh.errors import UsageError

    with pytest.raises(UsageError):
        slave.execute(["true"], env={f"REMSH_MANY_{i}": "x" for i in range(1100)})
    assert slave.connected
