"""Commands of a slave killed outright (SIGKILL) do not run on for good: a
slave restarted on the same base directory kills the process groups its
predecessor recorded (remsh.slave.pgroups), background grandchildren
included, and never a group that is not the recorded one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from remsh.slave import pgroups
from tests.slaveproc import slave_procs, tcp_listener, wait_registered  # noqa: F401
from tests.util import WAIT, environment, process_alive, wait_until

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not os.path.isdir("/proc"), reason="the record needs /proc")]


def _pids(path: Path, count: int) -> List[int]:
    """The ``count`` pids a command wrote to ``path`` (waiting for them, bounded)."""
    def ready() -> bool:
        return path.exists() and len(path.read_text().split()) >= count
    wait_until(ready, what=f"{count} pids in {path}")
    return [int(p) for p in path.read_text().split()[:count]]


def _run_in_background(slave, argv) -> threading.Thread:
    """Start ``slave.execute(argv)`` in a thread (it ends with an error once the slave dies)."""
    def run() -> None:
        try:
            slave.execute(argv)
        except Exception:  # noqa: BLE001 - the slave is killed under it
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _spawn_group() -> "subprocess.Popen[bytes]":
    """A real process group of its own (a session leader running sleep)."""
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


@pytest.fixture
def reap():
    """Processes to kill at teardown, whatever the test did."""
    pids: List[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _guardian_of(pid: int) -> int:
    """The guardian process of slave ``pid``: its child in its own process group."""
    own = pgroups.proc_stat(pid)
    assert own is not None
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and int(fields[2]) == own[0]:
                return int(name)
    pytest.fail(f"slave {pid} has no guardian process")


def _state(tmp_path: Path) -> Dict[str, Optional[str]]:
    """The environment giving a slave a state directory of the test's own."""
    return {"XDG_STATE_HOME": str(tmp_path / "state")}


def _record_of(tmp_path: Path, base: Path) -> str:
    with environment({b"XDG_STATE_HOME": os.fsencode(tmp_path / "state")}):
        where = pgroups.record_dir(str(base), None)
    assert where is not None
    return where


def _start_command(tcp_listener, slave_procs, base: Path, pidfile: Path):  # noqa: F811
    """A slave on ``base`` running `sh -c 'sleep 300 & ...; wait'`; (slave process, [grandchild, shell])."""
    listener = tcp_listener()
    first = slave_procs.start(listener.port, "first", basedir=base, env=_state(pidfile.parent))
    slave = wait_registered(listener, first)
    _run_in_background(slave, ["sh", "-c", f'sleep 300 & echo $! > {pidfile}; echo $$ >> {pidfile}; wait'])
    pids = _pids(pidfile, 2)
    # the command runs before the slave records its group (and tells its
    # guardian, just before): a slave killed in between leaves it unknown
    record = _record_of(pidfile.parent, base)
    wait_until(lambda: _listed(record, pids[1]), WAIT, "the slave to record the command's group")
    return listener, first, pids


def _listed(record: str, pgid: int) -> bool:
    """Whether a record file in the directory ``record`` lists group ``pgid``."""
    for name in os.listdir(record):
        try:
            lines = Path(record, name).read_text().splitlines()
        except OSError:
            continue
        if any(line.split()[:1] == [str(pgid)] for line in lines):
            return True
    return False


def test_commands_die_with_a_slave_killed_outright(tcp_listener, slave_procs, tmp_path, reap):  # noqa: F811
    """SIGKILL a slave running `sh -c 'sleep & ...'`: its guardian kills the shell and the background grandchild at once."""
    base = tmp_path / "base"
    base.mkdir()
    _, first, pids = _start_command(tcp_listener, slave_procs, base, tmp_path / "pids")
    reap.extend(pids)
    guardian = _guardian_of(first.pid)
    first.signal(signal.SIGKILL)
    first.wait()
    wait_until(lambda: not any(process_alive(p) for p in pids), timeout=WAIT,
               what="the commands of the killed slave to die")
    wait_until(lambda: not process_alive(guardian), timeout=WAIT, what="the guardian to end")


def test_restarted_slave_kills_what_its_killed_predecessor_left(tcp_listener, slave_procs, tmp_path, reap):  # noqa: F811
    """SIGKILL a slave and its guardian: a slave started on the same basedir kills the shell and its background grandchild."""
    base = tmp_path / "base"
    base.mkdir()
    listener, first, pids = _start_command(tcp_listener, slave_procs, base, tmp_path / "pids")
    reap.extend(pids)
    record = Path(_record_of(tmp_path, base))
    assert (os.stat(record).st_mode & 0o777) == 0o700 and len(os.listdir(record)) == 1
    assert os.listdir(base) == []  # nothing of the slave's own in the master's directory
    guardian = _guardian_of(first.pid)
    os.kill(guardian, signal.SIGKILL)  # (killed with the slave's whole process group, say)
    first.signal(signal.SIGKILL)
    first.wait()
    wait_until(lambda: not process_alive(guardian), timeout=WAIT, what="the guardian to die")
    assert all(process_alive(p) for p in pids)  # nothing else kills them
    second = slave_procs.start(listener.port, "second", basedir=base, env=_state(tmp_path))
    # a new slave process starts (Python, its guardian) before it looks: a bound for a loaded machine
    wait_until(lambda: not any(process_alive(p) for p in pids), timeout=3 * WAIT,
               what="the commands left by the killed slave to die")
    wait_registered(listener, second)
    assert [n for n in os.listdir(record)] and all(n.startswith("slave-") for n in os.listdir(record))
    assert len(os.listdir(record)) == 1  # the dead slave's file is gone, the new one's is there


def test_a_live_slave_on_the_same_basedir_keeps_its_commands(tcp_listener, slave_procs, tmp_path, reap):  # noqa: F811
    """A second slave started on a basedir whose first slave is alive leaves the first one's command running."""
    base = tmp_path / "base"
    base.mkdir()
    pidfile = tmp_path / "pids"
    listener = tcp_listener()
    first = slave_procs.start(listener.port, "first", basedir=base, env=_state(tmp_path))
    slave = wait_registered(listener, first)
    _run_in_background(slave, ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"])
    (pid,) = _pids(pidfile, 1)
    reap.append(pid)
    wait_registered(listener, slave_procs.start(listener.port, "second", basedir=base, env=_state(tmp_path)))
    assert process_alive(pid)
    assert len(os.listdir(_record_of(tmp_path, base))) == 2  # each slave its own file


def _dead_slave_record(directory: Path, entries: List[tuple]) -> None:
    """A record file as a slave that died would have left it (unlocked)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    (directory / "slave-1-dead").write_bytes(b"".join(b"%d %d\n" % e for e in entries))


def test_a_group_whose_leader_started_at_another_time_is_spared(tmp_path, reap):
    """A recorded group number now held by a stranger (the leader's start time differs) is not killed; the right one is."""
    stranger = _spawn_group()
    reap.append(stranger.pid)
    stat = pgroups.proc_stat(stranger.pid)
    assert stat is not None and stat[0] == stranger.pid
    directory = tmp_path / "rec"
    _dead_slave_record(directory, [(stranger.pid, stat[2] + 1)])
    record = pgroups.GroupRecord(str(directory))
    record.open()
    try:
        assert record.reap_predecessors() == 0
        assert stranger.poll() is None
        _dead_slave_record(directory, [(stranger.pid, stat[2])])
        assert record.reap_predecessors() == 1
        assert stranger.wait(WAIT) == -signal.SIGKILL
    finally:
        record.close()


def test_a_locked_record_is_left_alone(tmp_path, reap):
    """A record whose slave is alive (its file locked) is neither acted on nor removed."""
    victim = _spawn_group()
    reap.append(victim.pid)
    stat = pgroups.proc_stat(victim.pid)
    assert stat is not None
    directory = tmp_path / "rec"
    live = pgroups.GroupRecord(str(directory))
    live.open()
    other = pgroups.GroupRecord(str(directory))
    try:
        live.started(victim.pid)
        other.open()
        assert other.reap_predecessors() == 0
        assert victim.poll() is None and os.path.exists(live.path)
    finally:
        live.close()
        other.close()


def test_record_lives_in_the_state_directory_never_in_the_root(tmp_path, monkeypatch):
    """The record is in $XDG_STATE_HOME/remsh-slave/KEY (KEY from the basedir); none when that is inside --root."""
    from remsh.slave.policy import Policy

    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    where = pgroups.record_dir(str(root), Policy(root=str(root)))
    assert where is not None and os.path.dirname(where) == str(tmp_path / "state" / "remsh-slave")
    assert where == pgroups.record_dir(str(root / "."), None) != pgroups.record_dir(str(tmp_path), None)
    monkeypatch.setenv("XDG_STATE_HOME", str(root / "state"))
    assert pgroups.record_dir(str(root), Policy(root=str(root))) is None


def test_no_record_under_a_policy_without_a_root(tmp_path, monkeypatch):
    """A master confined by --no-execute or --allow-command alone can write files anywhere the user can: no record it could plant for a restarted slave to act on."""
    from remsh.slave.policy import Policy

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    base = str(tmp_path)
    assert pgroups.record_dir(base, Policy(execute=False)) is None
    assert pgroups.record_dir(base, Policy(allow_commands=["/bin/true"])) is None
    assert pgroups.record_dir(base, None) is not None
    outside = tmp_path / "root"
    outside.mkdir()
    assert pgroups.record_dir(base, Policy(root=str(outside), execute=False)) is not None


def test_a_record_directory_open_to_others_is_refused(tmp_path):
    """A record directory (or its parent) that others may write is not used (they could plant records), and the error says how to fix it."""
    for opened in ("parent", "rec"):
        top = tmp_path / opened
        (top / "parent" / "rec").mkdir(parents=True, mode=0o700)
        os.chmod(top / "parent" / "rec" if opened == "rec" else top / "parent", 0o777)
        with pytest.raises(OSError) as e:
            pgroups.GroupRecord(str(top / "parent" / "rec")).open()
        assert "lets others in" in str(e.value) and "chmod 700" in str(e.value)  # the warning says what to do



def test_a_clean_exit_leaves_no_record_and_no_guardian(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """A slave ended by SIGTERM removes its record (and the emptied directories) and its guardian ends with it."""
    base = tmp_path / "base"
    base.mkdir()
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "clean", basedir=base, env=_state(tmp_path))
    wait_registered(listener, proc)
    guardian = _guardian_of(proc.pid)
    assert os.listdir(_record_of(tmp_path, base))
    proc.signal(signal.SIGTERM)
    assert proc.wait() == 143
    assert not (tmp_path / "state" / "remsh-slave").exists()
    wait_until(lambda: not process_alive(guardian), timeout=WAIT, what="the guardian to end")
