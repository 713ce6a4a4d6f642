"""The private-access check that `make test` runs: no module of remsh reads
or writes another object's underscore attribute, and the check finds one
when there is one."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.check_private_access import private_accesses, scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_remsh_touches_no_other_objects_private_attribute():
    """No module of remsh uses ``x._name`` with ``x`` other than self/cls."""
    assert scan(os.path.join(ROOT, "remsh")) == []


def test_another_objects_underscore_attribute_is_found():
    """Reading, calling and assigning another object's ``_name`` all count."""
    source = ("def f(slave, box):\n"
              "    slave._read('x')\n"
              "    n = box._size\n"
              "    box._size = n\n")
    assert sorted(line for line, _ in private_accesses(source)) == [2, 3, 4]


def test_a_chain_through_self_still_counts():
    """``self.server._forget`` reaches into the server: counted."""
    assert list(private_accesses("class C:\n    def f(self):\n        self.server._forget(self)\n")) == [
        (3, "self.server._forget")]


def test_own_dunder_and_public_underscore_names_do_not_count():
    """self._x, cls._x, x.__class__, os._exit and namedtuple's _replace are fine."""
    source = ("import os\n"
              "class C:\n"
              "    def f(self, p):\n"
              "        self._a = type(p).__name__\n"
              "        p = p._replace(a=1)\n"
              "        os._exit(0)\n"
              "    @classmethod\n"
              "    def g(cls):\n"
              "        return cls._b\n")
    assert list(private_accesses(source)) == []


def test_the_command_fails_and_names_the_access(tmp_path):
    """Run as `make lint` runs it: exit status 1, the file and line printed."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f(x):\n    return x._secret\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "check_private_access.py"), str(pkg)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "a.py:2: x._secret" in done.stdout
