"""``remsh-slave`` failing over between masters reached over SSH: repeated
``--ssh`` (a master's embedded SSH server) and ``--via-ssh`` (a tunnel
through a stock OpenSSH ``sshd`` started by the test on 127.0.0.1), tried
in the order given, one master at a time.  Real ``remsh master``
processes, a real ``sshd``, a real slave process through the system's
``ssh`` and through paramiko."""

from __future__ import annotations

import argparse
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, List, Optional

import pytest

from remsh.slave.failover import masters
from remsh.slave.main import build_parser
from remsh.transports import openssh, ssh
from tests.slaveproc import SECRET
from tests.sshd import HOST, SlaveProcs, Sshd, make_key, require_sshd, write_known_hosts
from tests.test_fleet import Master, remsh, wait_names

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ssh-agent for the slaves: keys come from files only."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The embedded server's host key and the slave's key."""
    d = tmp_path_factory.mktemp("keys")
    k = SimpleNamespace(dir=d)
    for name, kind in [("host", "ecdsa"), ("alpha", "ed25519")]:
        setattr(k, name, make_key(kind, d / name))
        setattr(k, name + "_path", d / name)
    return k


@pytest.fixture
def sshd(keys: SimpleNamespace, tmp_path: Path) -> Iterator[Sshd]:
    """An OpenSSH server on 127.0.0.1 letting the slave's key in (the second master's tunnel goes through it)."""
    require_sshd()
    (tmp_path / "sshd").mkdir()
    authorized = tmp_path / "sshd" / "authorized_keys"
    authorized.write_text(f"{keys.alpha.get_name()} {keys.alpha.get_base64()} alpha\n")
    server = Sshd(tmp_path / "sshd" / "server", authorized).start()
    try:
        yield server
    finally:
        server.stop()


def _private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


class Masters:
    """m1 with its embedded SSH server, m2 with a TCP listener behind the sshd; both with the same secret."""

    def __init__(self, tmp_path: Path, keys: SimpleNamespace) -> None:
        self.tmp_path = tmp_path
        self.secret = _private(tmp_path / "secret", SECRET)
        self.authorized = tmp_path / "authorized_keys"
        self.authorized.write_text(ssh.authorized_keys_line(keys.alpha, "alpha") + "\n")
        self.host_key = keys.host_path
        self.ssh_port = 0
        self.m1: Optional[Master] = None
        self.m2: Optional[Master] = None
        self.started: List[Master] = []

    def start_m1(self) -> Master:
        workdir = self.tmp_path / "m1"
        workdir.mkdir(exist_ok=True)
        m = Master(workdir, workdir / "m.sock", secret_file=self.secret,
                   extra=["--ssh-listen", f"{HOST}:{self.ssh_port}", "--host-key", str(self.host_key),
                          "--authorized-keys", str(self.authorized)])
        self.started.append(m)
        m.wait_ready()
        found = re.search(r"listening for SSH slaves on [\d.]+:(\d+)", m.text())
        assert found, m.text()
        self.ssh_port = int(found.group(1))
        self.m1 = m
        return m

    def start_m2(self) -> Master:
        workdir = self.tmp_path / "m2"
        workdir.mkdir(exist_ok=True)
        m = Master(workdir, workdir / "m.sock", secret_file=self.secret)
        self.started.append(m)
        self.m2 = m.wait_ready()
        return m

    def stop(self) -> None:
        for m in self.started:
            m.stop()


@pytest.fixture
def two(tmp_path: Path, keys: SimpleNamespace) -> Iterator[Masters]:
    ms = Masters(tmp_path, keys)
    try:
        ms.start_m1()
        ms.start_m2()
        yield ms
    finally:
        ms.stop()


def _transport(master: Master, name: str) -> str:
    rows = wait_names(master.sock, [name], timeout=30)
    return str(next(r for r in rows if r["name"] == name)["transport"])


def _runs_on(master: Master, text: str) -> None:
    r = remsh(master.sock, "run", "-t", "alpha", "--", "echo", text)
    assert r.returncode == 0 and text in r.stdout.decode(), r.stderr.decode()


@pytest.mark.parametrize("client", ["openssh", "paramiko"])
def test_a_slave_fails_over_from_an_embedded_ssh_master_to_one_behind_sshd_and_back(
        client: str, two: Masters, sshd: Sshd, keys: SimpleNamespace, tmp_path: Path) -> None:
    """--ssh m1 --via-ssh sshd: the slave serves m1 (first given) over SSH; m1 killed, it serves m2 through sshd; m2 killed with m1 back, it returns to m1."""
    if client == "openssh" and openssh.find_ssh() is None and not os.environ.get("CI"):
        pytest.skip("the OpenSSH client (ssh) is not installed")
    kh = write_known_hosts(tmp_path / "kh", [(HOST, two.ssh_port, keys.host), (HOST, sshd.port, sshd.host_key)])
    args = ["--ssh-client", client, "--ssh", f"remsh@{HOST}:{two.ssh_port}",
            "--via-ssh", f"{sshd.user}@{HOST}:{sshd.port}", "--identity", str(keys.alpha_path),
            "--known-hosts", str(kh), "--secret-file", str(two.secret), "--max-backoff", "0.5", "-v"]
    if client == "openssh":
        args += ["-F", str(_private(tmp_path / "ssh_config", b""))]
    procs = SlaveProcs(tmp_path / "slaves")
    try:
        p = procs.start([*args, HOST, str(two.m2.port)], name="alpha")
        assert two.m1 is not None and two.m2 is not None
        assert _transport(two.m1, "alpha") == "ssh", procs.log_text(p)
        _runs_on(two.m1, "on m1")
        two.m1.stop(signal.SIGKILL)
        assert _transport(two.m2, "alpha") == "tcp", procs.log_text(p)  # the tunnel ends at m2's TCP listener
        _runs_on(two.m2, "on m2")
        assert f"trying the next master, {HOST}:{two.m2.port} via {HOST}:{sshd.port}" in procs.log_text(p)
        two.start_m1()  # on the same SSH port
        two.m2.stop(signal.SIGKILL)
        assert _transport(two.m1, "alpha") == "ssh", procs.log_text(p)
        _runs_on(two.m1, "back on m1")
        assert p.poll() is None, procs.log_text(p)
    finally:
        procs.close()


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_several_ssh_and_via_ssh_are_masters_in_the_order_given() -> None:
    """--via-ssh, --ssh, --via-ssh and a --failover: four masters in that order, each hop alone in its options."""
    args = _parse("--via-ssh", "u@j1:2201", "--ssh", "remsh@m2:2222", "--via-ssh", "u@j3",
                  "--failover", "m4:7447", "10.0.0.1", "7447")
    made: List[argparse.Namespace] = []
    found = masters(args, lambda one: made.append(one) or (lambda: None))  # type: ignore[func-returns-value]
    assert [label for label, _ in found] == ["10.0.0.1:7447 via j1:2201", "m2:2222 (ssh)", "10.0.0.1:7447 via j3",
                                             "m4:7447 via j1:2201"]
    assert [(one.ssh, one.via_ssh) for one in made] == [
        (None, ("u", "j1", 2201)), (("remsh", "m2", 2222), None), (None, ("u", "j3", None)),
        (None, ("u", "j1", 2201))]
    single = _parse("--ssh", "remsh@m1", "--failover", "m2:2222")
    assert [label for label, _ in masters(single, lambda one: lambda: None)] == ["m1:22 (ssh)",  # type: ignore
                                                                                 "m2:2222 (ssh)"]


def test_via_ssh_among_several_hops_needs_host_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    """--ssh twice needs no HOST PORT; with a --via-ssh among the hops the slave refuses to start without them (exit 2)."""
    from remsh.slave.main import main

    assert _parse("--ssh", "remsh@m1", "--ssh", "remsh@m2").hops == [("ssh", ("remsh", "m1", None)),
                                                                    ("ssh", ("remsh", "m2", None))]
    with pytest.raises(SystemExit) as exited:
        main(["--ssh", "remsh@m1", "--via-ssh", "u@j2"])
    assert exited.value.code == 2
    assert "HOST and PORT are required" in capsys.readouterr().err
