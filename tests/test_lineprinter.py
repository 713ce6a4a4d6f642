"""remsh.lineprinter: whole prefixed lines, bounded memory, linear work, no
stream held by one slave's output."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from typing import List

import pytest

from remsh.lineprinter import MAX_LINE, LineBuffer, LinePrinter, printable
from tests.util import WAIT, run_in_thread, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_49_mib_without_newline_is_held_in_bounded_memory_with_linear_work():
    """49 MiB with no newline, in 4 KiB chunks: under 64 KiB held at any time, each byte joined at most once."""
    lines: List[int] = []
    buf = LineBuffer(lambda line: lines.append(len(line)))
    chunk = b"x" * 4096
    total = 49 * MiB + 100
    fed = 0
    most_held = 0
    while fed < total:
        piece = chunk[:min(len(chunk), total - fed)]
        buf.feed(piece)
        fed += len(piece)
        most_held = max(most_held, buf.held)
    buf.flush()
    assert most_held < MAX_LINE
    assert buf.bytes_joined <= total  # re-joining on every chunk would be ~ total**2 / 8 KiB
    assert sum(lines) == total
    assert lines[:-1] == [MAX_LINE] * (total // MAX_LINE)
    assert lines[-1] == 100


def test_partial_line_longer_than_64_kib_is_written_before_the_output_ends():
    """A partial line reaching 64 KiB is written at once, not when the line or the output ends."""
    lines: List[bytes] = []
    buf = LineBuffer(lines.append)
    buf.feed(b"a" * 40000)
    assert lines == []
    buf.feed(b"b" * 40000)
    assert lines == [b"a" * 40000 + b"b" * (MAX_LINE - 40000)]
    assert buf.held == 80000 - MAX_LINE
    buf.feed(b"c\n")
    assert lines[1] == b"b" * (80000 - MAX_LINE) + b"c"


def test_lines_are_split_at_newlines_in_any_chunking():
    """The same lines come out however the bytes are chunked, an empty line included."""
    data = b"one\n\ntwo three\nfour"
    for size in (1, 2, 3, 5, len(data)):
        lines: List[bytes] = []
        buf = LineBuffer(lines.append, max_line=8)
        for i in range(0, len(data), size):
            buf.feed(data[i:i + size])
        buf.flush()
        assert lines == [b"one", b"", b"two thre", b"e", b"four"], size


def test_long_lines_are_cut_between_utf8_characters():
    """A cut at the line limit never splits a UTF-8 character."""
    lines: List[bytes] = []
    buf = LineBuffer(lines.append, max_line=8)
    buf.feed("é".encode() * 9 + b"\n")  # 18 bytes of two-byte characters
    assert lines == ["éééé".encode(), "éééé".encode(), "é".encode()]
    assert all(line.decode("utf-8") for line in lines)


def test_printer_prefixes_each_line_and_keeps_streams_apart():
    """Each line gets its slave's padded name; stdout and stderr lines go to their own stream."""
    out, err = io.StringIO(), io.StringIO()
    p = LinePrinter(["a", "bbb"])
    p.write("a", out, b"hello\nwor")
    p.write("bbb", err, b"oops\n")
    p.write("a", out, b"ld\n")
    p.write("bbb", out, b"tail")
    p.flush("bbb", out)
    p.flush_all()
    assert out.getvalue().splitlines() == ["a   | hello", "a   | world", "bbb | tail"]
    assert err.getvalue().splitlines() == ["bbb | oops"]


def test_lines_of_many_slaves_never_mix():
    """Eight threads writing long lines in small chunks to one stream: every line comes out whole."""
    out = io.StringIO()
    names = [f"s{i}" for i in range(8)]
    p = LinePrinter(names)

    def produce(name: str) -> None:
        line = (name * 3000).encode() + b"\n"
        for _ in range(20):
            for i in range(0, len(line), 777):
                p.write(name, out, line[i:i + 777])

    workers = [threading.Thread(target=produce, args=(n,)) for n in names]
    for t in workers:
        t.start()
    for t in workers:
        t.join(WAIT)
    p.flush_all()
    lines = out.getvalue().splitlines()
    assert len(lines) == 8 * 20
    for line in lines:
        name, _, text = line.partition(" | ")
        assert text == name * 3000


class _GatedStream(io.StringIO):
    """A stream whose writes of lines containing ``gate_on`` wait for ``gate``."""

    def __init__(self, gate_on: str) -> None:
        super().__init__()
        self.gate_on = gate_on
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.order: List[str] = []
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        if self.gate_on in text:
            self.entered.set()
            if not self.gate.wait(WAIT):
                raise AssertionError("gate never opened")
        with self.lock:
            self.order.append(text.split(" | ")[0].strip())
        return super().write(text)


def test_one_slaves_big_output_lets_another_slaves_line_through():
    """While a slave's 16-line burst is being written, another slave's line gets in before the burst ends."""
    out = _GatedStream(gate_on="AAAA")
    p = LinePrinter(["big", "small"])
    burst = run_in_thread(lambda: p.write("big", out, b"A" * (16 * MAX_LINE)))
    assert out.entered.wait(WAIT)  # big's first line is being written, holding the stream
    small = run_in_thread(lambda: p.write("small", out, b"hi\n"))
    # small is now queued on the stream (first come, first served) behind big's first line
    _wait_blocked(small.thread)
    out.gate.set()
    assert burst.done.wait(WAIT) and small.done.wait(WAIT)
    assert burst.error is None and small.error is None
    assert out.order.count("big") == 16
    assert out.order.index("small") < 15, out.order


def test_a_blocked_stream_does_not_hold_up_another_stream():
    """A slave stuck writing to a full stdout does not stop another slave's stderr lines."""
    stuck = _GatedStream(gate_on="a | ")
    err = io.StringIO()
    p = LinePrinter(["a", "b"])
    writer = run_in_thread(lambda: p.write("a", stuck, b"line\n"))
    assert stuck.entered.wait(WAIT)
    other = run_in_thread(lambda: p.write("b", err, b"still here\n"))
    try:
        assert other.done.wait(WAIT), "b's stderr line waited for a's stdout"
        wait_until(lambda: err.getvalue() == "b | still here\n", what="b's line on its own stream")
    finally:
        stuck.gate.set()
        writer.done.wait(WAIT)


def _wait_blocked(thread: threading.Thread) -> None:
    """Wait until ``thread`` is queued for a stream's lock (its stack is in FairLock's wait)."""

    def queued() -> bool:
        frame = sys._current_frames().get(thread.ident or 0)
        while frame is not None:
            if frame.f_code.co_name == "_wait_for":
                return True
            frame = frame.f_back
        return False

    wait_until(queued, what="the thread to queue for the stream")


# -- text from slaves on the terminal ---------------------------------------------


def test_printable_escapes_every_control_character():
    """C0 (tab and line feed too), DEL, C1, bidi overrides and separators are escaped; the rest stays as it is."""
    for code in list(range(0x20)) + [0x7F] + list(range(0x80, 0xA0)):
        assert printable(chr(code)) == f"\\x{code:02x}"
    assert printable("a\x1b]0;title\x07b\x1b[2J") == "a\\x1b]0;title\\x07b\\x1b[2J"
    assert printable("\u202eabc\u2028") == "\\u202eabc\\u2028"
    assert printable("\U000e0001") == "\\U000e0001"
    assert printable("caf\udce9") == "caf\\xe9"  # an undecodable byte (surrogate escape) shows as that byte
    plain = "Linux-6.1.0-x86_64-with-glibc2.36 café 名前 [ok] \\ 50%"
    assert printable(plain) is plain


def test_a_hostile_name_is_escaped_in_the_prefix_and_the_line_stays_exact():
    """A source name with escape sequences is printed escaped in every prefix; the output line itself is not."""
    out = io.StringIO()
    evil = "e\x1b[2Jvil\x9b"
    printer = LinePrinter(["ok", evil])
    printer.write(evil, out, b"\x1b[1mbold\x1b[0m\n")
    printer.write("stranger\x07", out, b"x\n")
    printer.flush_all()
    assert out.getvalue() == "e\\x1b[2Jvil\\x9b | \x1b[1mbold\x1b[0m\nstranger\\x07 | x\n"


# -- blocks, not a write per line ---------------------------------------------------


def test_many_lines_are_written_in_a_few_blocks():
    """20,000 lines arriving in 64 KiB chunks cost a handful of writes, not one per line, and come out exact."""
    out = io.StringIO()
    p = LinePrinter(["a"])
    data = b"".join(b"%d\n" % i for i in range(20000))
    for i in range(0, len(data), 65536):
        p.write("a", out, data[i:i + 65536])
    p.flush("a", out)
    assert out.getvalue() == "".join(f"a | {i}\n" for i in range(20000))
    assert p.lines == 20000
    assert p.writes(out) <= 6, p.writes(out)


def test_a_slow_commands_line_is_shown_without_waiting_for_more():
    """A lone line with nothing after it reaches the stream on the timer, well within the latency bound."""
    out = io.StringIO()
    p = LinePrinter(["a"])
    p.write("a", out, b"first\n")
    wait_until(lambda: out.getvalue() == "a | first\n", what="the line on the timer")
    assert p.writes(out) == 1


def test_prefixed_lines_carry_the_commands_bytes_unchanged():
    """Bytes that are not UTF-8 reach a text stream's binary layer as they were, prefix in front."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    p = LinePrinter(["a"])
    p.write("a", out, b"caf\xe9\n\xff\xfe\n")
    p.write_line(out, "remsh: done")
    assert raw.getvalue() == b"a | caf\xe9\na | \xff\xfe\nremsh: done\n"


def test_long_and_short_lines_mixed_in_any_chunking_come_out_as_line_by_line():
    """Lines over max_line among short ones, held parts, empty lines: the same lines as cutting one by one."""
    data = b"ab\n" + b"x" * 20 + b"\n\ncd" + b"y" * 9 + b"\nlast"
    expected: List[bytes] = []
    LineBuffer(expected.append, max_line=8).feed(data + b"\n")
    want = "".join(f"s | {line.decode()}\n" for line in expected)
    for size in (1, 2, 3, 7, 8, 9, 13, len(data)):
        out = io.StringIO()
        p = LinePrinter(["s"], max_line=8)
        for i in range(0, len(data), size):
            p.write("s", out, data[i:i + size])
        p.flush("s", out)
        assert out.getvalue() == want, size


def test_raw_output_is_written_as_it_came():
    """write_raw passes bytes through without prefix or cutting, in order with the lines of the stream."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8")
    p = LinePrinter(["a"])
    p.write_raw(out, b"no newline \xe9")
    p.write_raw(out, b" more\n")
    p.flush_all()
    assert raw.getvalue() == b"no newline \xe9 more\n"


def test_lines_waiting_for_the_timer_are_written_when_the_printer_closes():
    """A program that writes a line and leaves at once, by an exception, still prints it: the printer's with block writes what waits."""
    code = ("import sys; from remsh.lineprinter import LinePrinter\n"
            "try:\n"
            "    with LinePrinter(['a']) as p:\n"
            "        p.write('a', sys.stdout, b'last words\\n'); p.write('a', sys.stderr, b'and these\\n')\n"
            "        raise KeyboardInterrupt\n"
            "except KeyboardInterrupt:\n"
            "    pass\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=WAIT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"a | last words\n" and r.stderr == b"a | and these\n"
