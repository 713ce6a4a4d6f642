"""Review of work crossing masters as an attacker would: what one master of
a shared PostgreSQL store may write in another's job, and what the master
that asked a ``get`` puts in place from the bytes another master stored.
Real stores on a real PostgreSQL server (:mod:`tests.pgserver`); the
"other master" is a real :class:`~remsh.store.postgres.PostgresJobStore`
writing through the same calls a holder makes."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import pytest

from remsh import crossmaster
from remsh.carry import BlobWriter, load_path, store_path
from remsh.crossmaster import Crossing
from remsh.jobs import StoreSink
from remsh.master.fanout import Cancellation
from remsh.pacing import Pacing
from remsh.store import pgdispatch
from remsh.store.base import SessionRecord
from remsh.store.fencing import NotOwner
from remsh.store.postgres import PostgresJobStore
from tests.pgserver import pg_server, pg_uri  # noqa: F401 - fixtures
from tests.slaveproc import WAIT
from tests.test_store_postgres_masters import store_uri  # noqa: F401 - fixture
from tests.test_store_postgres_work import cluster  # noqa: F401 - fixture
from tests.util import wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def masters(pg_uri: str) -> Iterator[Tuple[PostgresJobStore, PostgresJobStore, PostgresJobStore]]:  # noqa: F811
    """Stores of masters x (the origin), y (a holder) and z (uninvolved) on one database."""
    stores = [PostgresJobStore(pg_uri, name) for name in ("x", "y", "z")]
    try:
        yield stores[0], stores[1], stores[2]
    finally:
        for store in stores:
            store.close()


def test_only_the_owner_settles_cancels_and_drops_and_only_a_claimer_stores_its_slaves_bytes(masters) -> None:
    """Master z cannot void, cancel or drop the bytes of x's parts; holder y stores only the blob of the slave it claimed, and only while its claim runs."""
    x, y, z = masters
    job = x.create_job("get", {"paths": ["/f", "/tmp"]}, 0, ["s", "t"])
    x.dispatch_write(pgdispatch.put_chunk, job.id, pgdispatch.SOURCE, 0, b"source")
    x.dispatch_write(pgdispatch.ask, job.id, [("s", "y"), ("t", "y")], "get", {"src": "/f"})
    ids = {d.slave: d.id for d in x.dispatch_read(pgdispatch.of_job, job.id)}
    assert z.dispatch_write(pgdispatch.settle, ids["t"], "pending", "lost", None, None) is False
    z.dispatch_write(pgdispatch.ask_cancel, job.id, "not z's job")
    assert y.dispatch_write(pgdispatch.claim, [ids["s"]], repeatable=False) == [ids["s"]]
    assert z.dispatch_write(pgdispatch.settle, ids["s"], "running", "lost", "y", y.epoch) is False
    assert {d.slave: (d.state, d.cancel_reason) for d in x.dispatch_read(pgdispatch.of_job, job.id)} == \
        {"s": ("running", None), "t": ("pending", None)}
    for store, name in ((z, "s"), (y, pgdispatch.SOURCE), (y, "t")):
        with pytest.raises(NotOwner):
            store.dispatch_write(pgdispatch.put_chunk, job.id, name, 0, b"forged")
    for store in (y, z):
        with pytest.raises(NotOwner):
            store.dispatch_write(pgdispatch.drop_blob, job.id, pgdispatch.SOURCE)
    assert x.dispatch_read(pgdispatch.chunk, job.id, pgdispatch.SOURCE, 0) == b"source"
    y.dispatch_write(pgdispatch.put_chunk, job.id, "s", 0, b"fetched")  # its claim runs
    assert x.dispatch_read(pgdispatch.chunk, job.id, "s", 0) == b"fetched"
    assert x.dispatch_write(pgdispatch.settle, ids["s"], "running", "lost", "y", y.epoch)
    with pytest.raises(NotOwner):  # the claim is void
        y.dispatch_write(pgdispatch.put_chunk, job.id, "s", 1, b"late")


def _tar(members: Mapping[str, bytes]) -> bytes:
    """A tar stream of regular files ``members`` (name -> data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _forged_get(x: PostgresJobStore, y: PostgresJobStore, dest: Path, values: Dict[str, Any], data: bytes,
                meta: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """x runs ``get /remote/thing dest`` on slave s of master y; y claims the
    part and reports ``data`` as what it fetched, described by ``meta`` over
    the true size and SHA-256 (``None``: no description reported).  s's
    record of the job when it ended."""
    job = x.create_job("get", {"paths": ["/remote/thing", str(dest)]}, 0, ["s"])
    cancellation = Cancellation()
    crossing = Crossing(x, {"s": "y"}, "get", {"paths": ["/remote/thing", str(dest)]}, values, Pacing(), 1)
    work = crossing.wrap(lambda sink, c: [])
    thread = threading.Thread(target=work, args=(StoreSink(x, job.id, cancellation), cancellation))
    thread.start()
    try:
        wait_until(lambda: x.dispatch_read(pgdispatch.of_job, job.id) != [], WAIT, "the part to be asked")
        (d,) = x.dispatch_read(pgdispatch.of_job, job.id)
        assert y.dispatch_write(pgdispatch.claim, [d.id], repeatable=False) == [d.id]
        writer = BlobWriter(y, job.id, "s", 1 << 30, "s: get")
        writer.write(data)
        described = {**writer.close(), **meta} if meta is not None else None
        assert y.dispatch_write(pgdispatch.finish, d.id, {"status": 0, "error": None, "errtag": None,
                                                           "summary": "", "blob": described})
    finally:
        thread.join(WAIT)
    assert not thread.is_alive()
    record = x.get_job(job.id).slaves["s"]
    return {"state": record.state, "error": record.error or ""}


def test_a_get_placed_from_another_master_has_no_set_id_bits(masters, tmp_path: Path) -> None:
    """A file another master stored for a get, said to be set-user-ID, is put in place without set-ID or sticky bits (as a local get)."""
    x, y, _ = masters
    ended = _forged_get(x, y, tmp_path, {}, b"#!/bin/sh\nid\n", {"tree": False, "mode": 0o7755})
    placed = tmp_path / "s" / "thing"
    assert ended["state"] == "ok", ended
    assert placed.read_bytes() == b"#!/bin/sh\nid\n"
    assert stat.S_IMODE(placed.stat().st_mode) & 0o7000 == 0


def test_a_tree_from_another_master_is_bounded_by_the_gets_entries(masters, tmp_path: Path) -> None:
    """A tree another master stored with more entries than the get's --max-files is refused whole: nothing under DEST/NAME/."""
    x, y, _ = masters
    data = _tar({f"f{i}": b"" for i in range(40)})
    ended = _forged_get(x, y, tmp_path, {"max_files": 10}, data, {"tree": True})
    assert ended["state"] == "failed" and "more than 10 entries" in ended["error"], ended
    assert not (tmp_path / "s").exists() or os.listdir(tmp_path / "s") == []


def test_a_get_reported_done_without_its_bytes_ends_failed(masters, tmp_path: Path) -> None:
    """A holder reporting a get done with no bytes stored does not make the part ok: it ends failed, nothing placed."""
    x, y, _ = masters
    ended = _forged_get(x, y, tmp_path, {}, b"", None)
    assert ended["state"] == "failed" and "no bytes stored" in ended["error"], ended
    assert not (tmp_path / "s").exists() or os.listdir(tmp_path / "s") == []


def test_a_blob_said_larger_than_what_crosses_masters_is_refused(masters, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A get result past MAX_CARRIED, however the other master bounded it, is refused before a byte is read: nothing placed."""
    monkeypatch.setattr(crossmaster, "MAX_CARRIED", 1000)
    x, y, _ = masters
    ended = _forged_get(x, y, tmp_path, {}, b"z" * 5000, {"tree": False})
    assert ended["state"] == "failed" and "more than the 1000 bytes" in ended["error"], ended
    assert not (tmp_path / "s").exists() or os.listdir(tmp_path / "s") == []


def test_a_holder_loads_a_put_only_inside_its_private_directory(cluster, store_uri: str,  # noqa: F811
                                                                tmp_path: Path) -> None:
    """A put part whose source name, written by another master, is an absolute path or '..' fails on holder b; nothing is written outside its directory."""
    _, b, _ = cluster
    x = PostgresJobStore(store_uri, "x")
    try:
        src = tmp_path / "payload"
        src.write_bytes(b"ssh-ed25519 AAAA attacker\n")
        for base in (str(tmp_path / "escaped"), ".."):
            job = x.create_job("put", {"paths": [str(src), str(tmp_path / "on-slave")]}, 0, ["s-b"])
            meta = store_path(x, job.id, pgdispatch.SOURCE, str(src), 1 << 20, "put")
            x.dispatch_write(pgdispatch.ask, job.id, [("s-b", "b")], "put",
                             {"dest": str(tmp_path / "on-slave"), "base": base, "blob": meta})
            wait_until(lambda: x.dispatch_read(pgdispatch.of_job, job.id)[0].state == "done", WAIT,
                       "s-b's part to end")
            (d,) = x.dispatch_read(pgdispatch.of_job, job.id)
            assert d.claimed_by == "b" and "is not a file name" in ((d.result or {}).get("error") or ""), d.result
        assert not (tmp_path / "escaped").exists(), b.text()
        assert not (tmp_path / "on-slave").exists()
    finally:
        x.close()


def test_the_bytes_a_dead_holder_stored_for_a_get_are_deleted_with_its_part(masters, tmp_path: Path) -> None:
    """A holder that stored part of a get's bytes and stopped before reporting: its part ends lost and its bytes leave the store."""
    x, y, _ = masters
    job = x.create_job("get", {"paths": ["/remote/thing", str(tmp_path)]}, 0, ["s"])
    cancellation = Cancellation()
    crossing = Crossing(x, {"s": "y"}, "get", {"paths": ["/remote/thing", str(tmp_path)]}, {}, Pacing(), 1)
    thread = threading.Thread(target=crossing.wrap(lambda sink, c: []),
                              args=(StoreSink(x, job.id, cancellation), cancellation))
    thread.start()
    try:
        wait_until(lambda: x.dispatch_read(pgdispatch.of_job, job.id) != [], WAIT, "the part to be asked")
        (d,) = x.dispatch_read(pgdispatch.of_job, job.id)
        assert y.dispatch_write(pgdispatch.claim, [d.id], repeatable=False) == [d.id]
        y.dispatch_write(pgdispatch.put_chunk, job.id, "s", 0, b"x" * 1000)
        y.close()  # stopped: no longer alive
    finally:
        thread.join(WAIT + crossmaster.MASTERS_EVERY)
    assert not thread.is_alive()
    assert x.get_job(job.id).slaves["s"].state == "lost"
    assert x.dispatch_read(pgdispatch.chunk, job.id, "s", 0) is None


def _realpath_limit_tar(dest_len: int) -> bytes:
    """A tar stream that, unpacked into a directory whose path is
    ``dest_len`` characters long, makes ``os.path.realpath`` give up inside
    a chain of links (the path past PATH_MAX) and so slips a link two levels
    up past the ``data`` filter of the Pythons without the fix of
    CVE-2025-4517: then a hard link to ``../../flag`` overwritten, and
    ``../../newfile`` made, through it."""
    steps = "abcdefghijklmnop"
    component = "d" * ((os.pathconf("/", "PC_PATH_MAX") - dest_len - 1) // (len(steps) + 1))
    buf = io.BytesIO()

    def add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, link: str = "",
            data: bytes = b"") -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(data)
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        path = ""
        for step in steps:
            add(tar, os.path.join(path, component), tarfile.DIRTYPE)
            add(tar, os.path.join(path, step), tarfile.SYMTYPE, component)
            path = os.path.join(path, component)
        long_link = os.path.join(*steps, "l" * 254)
        add(tar, long_link, tarfile.SYMTYPE, os.path.join(*[".."] * len(steps)))
        add(tar, "escape", tarfile.SYMTYPE, os.path.join(long_link, "..", ".."))
        add(tar, "flaglink", tarfile.LNKTYPE, os.path.join("escape", "flag"))
        add(tar, "flaglink", data=b"overwritten\n")
        add(tar, "escape/newfile", data=b"new\n")
    return buf.getvalue()


def test_a_tree_from_another_master_writes_nothing_through_its_own_links(masters, tmp_path: Path) -> None:
    """A tree whose members go through links of the same tree (the realpath-limit escape of the data filter) is refused: nothing outside DEST/NAME/BASE is written."""
    x, y, _ = masters
    flag = tmp_path / "flag"
    flag.write_bytes(b"original\n")
    # the tree is unpacked in DEST/s/.thing.remsh-part-XXXXXXXX (remsh.replace.hidden_beside)
    dest_len = len(str(tmp_path / "s" / ".thing.remsh-part-")) + 8
    ended = _forged_get(x, y, tmp_path, {}, _realpath_limit_tar(dest_len), {"tree": True})
    assert flag.read_bytes() == b"original\n"
    assert sorted(os.listdir(tmp_path)) == ["flag", "s"] or sorted(os.listdir(tmp_path)) == ["flag"]
    assert ended["state"] == "failed" and "goes through a link of the same tree" in ended["error"], ended


def test_a_tree_with_links_of_its_own_still_crosses(masters, tmp_path: Path) -> None:
    """A tree with a relative symbolic link inside it and two hard-linked files crosses the store whole under the link guard."""
    x, _, _ = masters
    job = x.create_job("put", {}, 0, ["s"])
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a\n")
    os.link(tree / "sub" / "a.txt", tree / "b.txt")
    os.symlink("sub/a.txt", tree / "link")
    meta = store_path(x, job.id, pgdispatch.SOURCE, str(tree), 1 << 20, "put")
    load_path(x, job.id, pgdispatch.SOURCE, meta, str(tmp_path / "back"), "put", max_entries=10)
    back = tmp_path / "back"
    assert (back / "link").read_text() == (back / "b.txt").read_text() == "a\n"
    assert os.readlink(back / "link") == "sub/a.txt"


def test_a_session_id_of_another_master_is_not_taken_over_by_recording_it(masters) -> None:
    """A master recording a session under an id another master's session holds is refused; the holder's row stays as it was."""
    x, y, _ = masters
    xs = x.create_job("run", {"args": ["true"]}, 0, ["s"])
    ys = y.create_job("run", {"args": ["true"]}, 0, ["t"])
    x.open_session(SessionRecord("c" * 32, "s", xs.id, "execute", 1, 0, 5))
    with pytest.raises(NotOwner, match="held by another master"):
        y.open_session(SessionRecord("c" * 32, "t", ys.id, "execute", 1, 0, 0))
    assert [(r.id, r.name, r.job_id, r.received) for r in x.open_sessions()] == [("c" * 32, "s", xs.id, 5)]
    x.open_session(SessionRecord("c" * 32, "s", xs.id, "execute", 1, 0, 7))  # its own is replaced
    assert [r.received for r in x.open_sessions()] == [7]
