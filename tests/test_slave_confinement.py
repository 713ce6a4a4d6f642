"""A confined remsh-slave (``--root``, ``--no-execute``, ``--allow-command``)
as a real process against what a hostile master tries: an ``LD_PRELOAD``
library run through an allowed program, the environment read by
``getenv``, and set-ID files planted inside the root.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from remsh.errors import DeniedError
from tests.slaveproc import slave_procs, tcp_listener, wait_registered  # noqa: F401

pytestmark = pytest.mark.timeout(120)

TRUE = shutil.which("true") or "/bin/true"
CC = shutil.which("cc") or shutil.which("gcc")

PRELOAD_SOURCE = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    int fd = open("MARKER", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) { write(fd, "ran\n", 4); close(fd); }
}
"""


def _preload_library(workdir: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes ``marker`` (compiled with the system's cc)."""
    if CC is None:
        pytest.skip("no C compiler to build an LD_PRELOAD library")
    src = workdir / "planted.c"
    src.write_text(PRELOAD_SOURCE.replace("MARKER", str(marker)))
    lib = workdir / "planted.so"
    done = subprocess.run([CC, "-shared", "-fPIC", "-o", str(lib), str(src)], capture_output=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"cc cannot build a shared library: {done.stderr[-500:]!r}")
    return lib.read_bytes()


def _confined(tcp_listener, slave_procs, tmp_path, name, *options):  # noqa: F811
    """A registered slave confined to tmp_path/root with ``options``; (slave, root)."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, name, basedir=root, extra_args=["--root", str(root), *options])
    return wait_registered(listener, proc), root


# -- finding: --allow-command bypassed through the environment -------------------------


def test_ld_preload_through_an_allowed_program_is_refused(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """A master allowed only `true` that sends a library and runs `true` with LD_PRELOAD gets DeniedError; the library never runs."""
    marker = tmp_path / "marker"
    library = _preload_library(tmp_path, marker)
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "preload", "--allow-command", TRUE)
    slave.send(io.BytesIO(library), "planted.so")
    assert (root / "planted.so").read_bytes() == library
    for env in ({"LD_PRELOAD": str(root / "planted.so")}, {"LD_LIBRARY_PATH": str(root)},
                {"BASH_ENV": str(root / "x")}, {"PYTHONPATH": str(root)}):
        with pytest.raises(DeniedError, match="--allow-env"):
            slave.execute([TRUE], env=env)
    assert not marker.exists()
    assert slave.execute([TRUE]) == 0  # the same command with the slave's own environment still runs
    assert not marker.exists()


def test_unsetting_a_variable_is_refused_too(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --allow-command, removing a variable (unset_NAME) is refused like setting one."""
    slave, _ = _confined(tcp_listener, slave_procs, tmp_path, "unset", "--allow-command", TRUE)
    with pytest.raises(DeniedError, match="--allow-env"):
        slave.execute([TRUE], env={"HOME": None})


def test_allow_env_lets_matching_names_through(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """--allow-env 'CI_*' (and LANG): such names may be set and unset; any other name is still refused."""
    env_prog = shutil.which("env") or "/usr/bin/env"
    slave, _ = _confined(tcp_listener, slave_procs, tmp_path, "allowenv", "--allow-command", env_prog,
                         "--allow-env", "CI_*", "--allow-env", "LANG")
    assert slave.info.get("policy_allow_env") == "CI_*\0LANG"
    out = bytearray()
    assert slave.execute([env_prog], stdout_cb=out.extend, env={"CI_JOB": "7", "LANG": None}) == 0
    lines = bytes(out).splitlines()
    assert b"CI_JOB=7" in lines and not any(line.startswith(b"LANG=") for line in lines)
    with pytest.raises(DeniedError):
        slave.execute([env_prog], env={"CI_JOB": "7", "ci_lower": "1"})  # case counts
    with pytest.raises(DeniedError):
        slave.execute([env_prog], env={"LD_PRELOAD": "/nonexistent.so"})


def test_allow_env_without_allow_command_is_a_usage_error(slave_procs, tmp_path):  # noqa: F811
    """remsh-slave --allow-env without --allow-command exits 2 before dialling (the option would mean nothing)."""
    proc = slave_procs.start(1, "envonly", no_reconnect=True, extra_args=["--allow-env", "CI_*"])
    assert proc.wait() == 2
    assert "--allow-env" in proc.log_text()


# -- finding: set-ID files under a policy -----------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _setid_tree(top: Path) -> Path:
    """A local tree: a set-user-ID program, a set-group-ID file, a set-group-ID directory."""
    (top / "bin").mkdir(parents=True)
    (top / "bin" / "suid").write_bytes(b"#!/bin/sh\nid\n")
    os.chmod(top / "bin" / "suid", 0o4755)
    (top / "sgid").write_bytes(b"data")
    os.chmod(top / "sgid", 0o2750)
    os.chmod(top / "bin", 0o2775)
    assert _mode(top / "bin" / "suid") == 0o4755 and _mode(top / "bin") == 0o2775
    return top


def test_send_and_chmod_under_root_drop_set_id_bits(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --root, send(mode=0o4755) and chmod(0o6777) give 0o755 and 0o777: no set-ID file appears."""
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "setid-send")
    slave.send(io.BytesIO(b"#!/bin/sh\nid\n"), "prog", mode=0o4755)
    assert _mode(root / "prog") == 0o755
    slave.chmod("prog", 0o6777)
    assert _mode(root / "prog") == 0o777
    slave.mkdir("d")
    slave.chmod("d", 0o2775)
    assert _mode(root / "d") == 0o775
    slave.chmod("prog", 0o700)  # other bits are applied as asked
    assert _mode(root / "prog") == 0o700


def test_chmod_of_the_root_itself_is_denied(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --root, chmod of the root (by '.', by its absolute path) is DeniedError and leaves its mode."""
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "chmod-root")
    before = _mode(root)
    for path in (".", str(root), "sub/.."):
        if path == "sub/..":
            slave.mkdir("sub")
        with pytest.raises(DeniedError):
            slave.chmod(path, 0o777)
    assert _mode(root) == before


def test_copy_under_root_makes_no_set_id_file(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --root, copying a set-user-ID file inside the root gives a file without set-ID bits."""
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "setid-copy")
    (root / "orig").write_bytes(b"x")
    os.chmod(root / "orig", 0o4755)
    slave.copy("orig", "copied")
    assert _mode(root / "copied") & 0o6000 == 0


def test_send_tree_under_root_drops_set_id_bits(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --root, send_tree of a tree holding set-ID files and directories lands without any set-ID bit."""
    src = _setid_tree(tmp_path / "src")
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "setid-tree")
    slave.send_tree(str(src), "got")
    assert _mode(root / "got" / "bin" / "suid") == 0o755
    assert _mode(root / "got" / "sgid") == 0o750
    assert _mode(root / "got" / "bin") == 0o775
    assert (root / "got" / "bin" / "suid").read_bytes() == b"#!/bin/sh\nid\n"


def test_sync_tree_under_root_drops_set_id_bits(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """Under --root, sync_tree neither creates set-ID entries nor turns an existing file set-ID by a mode change alone."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "tool", 0o755)
    slave, root = _confined(tcp_listener, slave_procs, tmp_path, "setid-sync")
    slave.sync_tree(str(src), "mirror")
    assert _mode(root / "mirror" / "tool") == 0o755
    os.chmod(src / "tool", 0o4755)  # same data: only the mode differs
    _setid_tree(src / "more")
    slave.sync_tree(str(src), "mirror")
    found = {p: _mode(p) for p in (root / "mirror").rglob("*")}
    assert found and all(m & 0o6000 == 0 for m in found.values()), {str(p): oct(m) for p, m in found.items()}
    assert _mode(root / "mirror" / "more" / "bin" / "suid") == 0o755


# -- finding: getenv outside the policy -----------------------------------------------------


@pytest.mark.parametrize("options", [["--no-execute"], ["--allow-command", TRUE]], ids=["no-execute", "allow-command"])
def test_getenv_is_denied_to_a_master_that_may_not_run_anything(tcp_listener, slave_procs, options):  # noqa: F811
    """Under --no-execute or --allow-command, getenv is DeniedError: a confined master cannot read the slave's credentials."""
    listener = tcp_listener()
    proc = slave_procs.start(listener.port, "getenv-" + options[0].strip("-"), extra_args=options,
                             env={"AWS_SECRET_ACCESS_KEY": "cloud-credential"})
    slave = wait_registered(listener, proc)
    with pytest.raises(DeniedError, match="getenv"):
        slave.getenv()
    assert slave.stat(".") == "d"  # the connection stays up


def test_getenv_under_root_alone_still_answers(tcp_listener, slave_procs, tmp_path):  # noqa: F811
    """With only --root (commands may run, and could print the environment anyway), getenv answers as before."""
    slave, _ = _confined(tcp_listener, slave_procs, tmp_path, "getenv-root")
    assert "PATH" in slave.getenv()
