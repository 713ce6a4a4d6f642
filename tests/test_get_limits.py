"""``remsh get --max-bytes / --max-files``: the bounds reach fetch and
fetch_tree on the master, a slave past them fails alone (exit 3) with
nothing of its copy kept, and it stays usable for the next get."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from remsh.cli import build_parser
from remsh.fleet import DEFAULT_GET_MAX_BYTES, DEFAULT_GET_MAX_FILES
from tests.test_fleet import Fleet, fleet  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_get_defaults_bound_bytes_and_files() -> None:
    """remsh get bounds each slave by default (64 GiB, 1,000,000 entries); the flags take sizes with units."""
    args = build_parser().parse_args(["get", "x", "dir"])
    assert (args.max_bytes, args.max_files) == (DEFAULT_GET_MAX_BYTES, DEFAULT_GET_MAX_FILES) == (64 << 30, 1_000_000)
    args = build_parser().parse_args(["get", "--max-bytes", "10M", "--max-files", "7", "x", "dir"])
    assert (args.max_bytes, args.max_files) == (10 << 20, 7)


def test_get_past_max_bytes_fails_that_slave_and_keeps_it(fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    """get --max-bytes of a bigger file exits 3 naming the bound, keeps nothing, and the slave serves the next get."""
    (fleet.base("web-1") / "big.bin").write_bytes(os.urandom(300_000))
    r = fleet.run("get", "--max-bytes", "100K", "-t", "web-1", "big.bin", str(tmp_path / "got"))
    assert r.returncode == 3, r.stderr
    assert "max_bytes" in r.stderr.decode()
    assert not (tmp_path / "got" / "web-1").exists(), "a failed get left its slave's directory"
    r = fleet.run("get", "-t", "web-1", "big.bin", str(tmp_path / "again"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "again" / "web-1" / "big.bin").stat().st_size == 300_000


def test_get_of_a_tree_past_max_files_fails_that_slave(fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    """get --max-files of a tree with more entries exits 3 naming max_entries and keeps nothing of it."""
    tree = fleet.base("web-2") / "many"
    tree.mkdir()
    for i in range(10):
        (tree / f"f{i}").write_bytes(b"x")
    r = fleet.run("get", "--max-files", "5", "-t", "web-2", "many", str(tmp_path / "got"))
    assert r.returncode == 3, r.stderr
    assert "max_entries" in r.stderr.decode()
    assert not (tmp_path / "got" / "web-2").exists(), "a failed get left its slave's directory"
    r = fleet.run("get", "--max-files", "11", "-t", "web-2", "many", str(tmp_path / "ok"))
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "ok" / "web-2" / "many")) == 10
