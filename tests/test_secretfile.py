"""remsh.secretfile: one way to read a secret file, and the secret leaves the environment."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from remsh.errors import LocalError
from remsh.secretfile import MAX_SECRET_FILE, read_secret_file, take_env_secret


def _file(tmp_path, data: bytes, mode: int = 0o600):
    path = tmp_path / "secret"
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("data, secret", [
    (b"s3cret", b"s3cret"),
    (b"s3cret\n", b"s3cret"),
    (b"s3cret\r\n", b"s3cret"),
    (b"s3cret\n\n", b"s3cret\n"),  # only one line break is dropped
    (b" s3cret \n", b" s3cret "),  # spaces are part of the secret
    (b"\ts3cret\r", b"\ts3cret\r"),  # a lone CR is not a line break
])
def test_one_trailing_line_break_is_dropped_and_nothing_else(tmp_path, data, secret):
    """read_secret_file strips one trailing \\n or \\r\\n only."""
    assert read_secret_file(_file(tmp_path, data)) == secret


@pytest.mark.parametrize("data", [b"", b"\n", b"\r\n"])
def test_empty_secret_is_refused(tmp_path, data):
    """A file holding no secret raises LocalError naming it."""
    path = _file(tmp_path, data)
    with pytest.raises(LocalError, match="is empty") as e:
        read_secret_file(path)
    assert path in str(e.value)


def test_missing_file_raises_local_error_with_the_oserror_chained(tmp_path):
    """A missing file raises LocalError naming it, with the OSError as its cause."""
    path = str(tmp_path / "none")
    with pytest.raises(LocalError) as e:
        read_secret_file(path)
    assert path in str(e.value) and isinstance(e.value.__cause__, FileNotFoundError)


def test_not_a_regular_file_or_too_big_is_refused(tmp_path):
    """A directory, or a file over MAX_SECRET_FILE, is not a secret file (and a FIFO does not block)."""
    with pytest.raises(LocalError, match="not a regular file"):
        read_secret_file(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(LocalError, match="not a regular file"):
        read_secret_file(str(fifo))
    with pytest.raises(LocalError, match="larger than"):
        read_secret_file(_file(tmp_path, b"x" * (MAX_SECRET_FILE + 1)))


@pytest.mark.parametrize("mode, warned", [(0o600, False), (0o400, False), (0o640, True), (0o604, True),
                                          (0o620, True)])
def test_file_open_to_group_or_others_warns_naming_it(tmp_path, caplog, mode, warned):
    """A secret file that group or others may access is used, with a warning naming it."""
    path = _file(tmp_path, b"s3cret\n", mode)
    with caplog.at_level(logging.WARNING, logger="remsh.secretfile"):
        assert read_secret_file(path) == b"s3cret"
    messages = [r.getMessage() for r in caplog.records]
    assert any(path in m and "group or others" in m for m in messages) is warned, messages


def test_env_secret_is_taken_out_of_both_environment_views_and_children():
    """take_env_secret returns REMSH_SECRET and removes it from os.environ, os.environb and child processes."""
    code = ("import os, subprocess, sys\n"
            "from remsh.secretfile import take_env_secret\n"
            "s = take_env_secret()\n"
            "child = subprocess.run(['env'], capture_output=True).stdout\n"
            "print(s, 'REMSH_SECRET' in os.environ, b'REMSH_SECRET' in os.environb, b'REMSH_SECRET' in child,"
            " take_env_secret())\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, REMSH_SECRET="from-env \n", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().split("\n")[0] == "b'from-env \\n' False False False None"


def test_env_secret_absent_is_none(monkeypatch):
    """Without REMSH_SECRET (or with it empty) there is no secret, and the variable is gone afterwards."""
    monkeypatch.delenv("REMSH_SECRET", raising=False)
    assert take_env_secret() is None
    monkeypatch.setenv("REMSH_SECRET", "")
    assert take_env_secret() is None
    assert "REMSH_SECRET" not in os.environ
