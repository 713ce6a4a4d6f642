"""The slave's policy (remsh.slave.policy) on the real file system: paths
confined to --root against '..', absolute paths, symlinks pointing out and
symlinks swapped in during an operation (with openat2 and with the
component walk), names with NUL, --no-execute and --allow-command after a
PATH search, and what the register box reports.

Every test runs with a scratch directory of its own as the current
directory.
"""

from __future__ import annotations

import os
import subprocess
from typing import Tuple

import pytest

from remsh.errors import DeniedError, InvalidRequestError, NotFoundError, UsageError
from remsh.slave import fsops, policy as policy_mod
from remsh.slave.policy import DIR_FLAGS, Policy


def b(p: object) -> bytes:
    return os.fsencode(p)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def own_cwd(tmp_path, monkeypatch) -> None:
    """The current directory is a scratch directory of the test's own."""
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch) -> str:
    """Run a confinement test with the kernel's openat2 and with the O_NOFOLLOW walk."""
    if request.param == "openat2":
        if not policy_mod.openat2_available():
            pytest.skip("this kernel has no openat2")
    else:
        monkeypatch.setattr(policy_mod, "_openat2", False)
    return str(request.param)


@pytest.fixture
def tree(tmp_path) -> Tuple[bytes, bytes]:
    """(root, outside): root holds a/, a/file, link-in -> a, link-out -> outside,
    abs-in -> ROOT/a (absolute), up -> .. ; outside holds secret."""
    root = b(tmp_path / "root")
    outside = b(tmp_path / "outside")
    os.makedirs(os.path.join(root, b"a"))
    os.mkdir(outside)
    with open(os.path.join(root, b"a", b"file"), "wb") as f:
        f.write(b"inside")
    with open(os.path.join(outside, b"secret"), "wb") as f:
        f.write(b"secret")
    os.symlink(b"a", os.path.join(root, b"link-in"))
    os.symlink(outside, os.path.join(root, b"link-out"))
    os.symlink(b"../outside", os.path.join(root, b"rel-out"))
    os.symlink(os.path.join(root, b"a"), os.path.join(root, b"abs-in"))
    os.symlink(b"..", os.path.join(root, b"up"))
    return root, outside


def read_via(pol: Policy, path: bytes) -> bytes:
    with fsops.open_regular(path, pol) as f:
        return f.read()


# -- construction and info ----------------------------------------------------------

def test_policy_is_immutable_and_checks_its_root(tmp_path):
    """A Policy cannot be changed; a missing root or a bad pattern is a UsageError."""
    pol = Policy()
    with pytest.raises(AttributeError):
        pol.root = b"/"  # type: ignore[misc]
    with pytest.raises(UsageError):
        Policy(root=str(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError):
        Policy(root=str(tmp_path / "file"))
    with pytest.raises(UsageError):
        Policy(allow_commands=["/bin/a\0b"])
    with pytest.raises(UsageError):
        Policy(allow_commands=[""])


def test_info_reports_what_applies(tmp_path):
    """info(): policy_execute always; policy_root and policy_allow_command (NUL-joined) only when set."""
    assert Policy().info() == {"policy_execute": "y"}
    os.mkdir(tmp_path / "r")
    os.symlink(tmp_path / "r", tmp_path / "alias")
    pol = Policy(root=str(tmp_path / "alias"), execute=False, allow_commands=["/usr/bin/*", "/bin/true"])
    assert pol.info() == {"policy_execute": "n", "policy_root": str(tmp_path / "r"),
                          "policy_allow_command": "/usr/bin/*\0/bin/true"}


def test_info_reports_allow_env(tmp_path):
    """info(): policy_allow_env (NUL-joined) when environment patterns are given."""
    pol = Policy(allow_commands=["/bin/true"], allow_env=["CI_*", "LANG"])
    assert pol.info() == {"policy_execute": "y", "policy_allow_command": "/bin/true",
                          "policy_allow_env": "CI_*\0LANG"}
    assert pol != Policy(allow_commands=["/bin/true"])


def test_allow_env_needs_allow_commands():
    """Environment patterns without command patterns would mean nothing: a UsageError, as is a bad pattern."""
    with pytest.raises(UsageError):
        Policy(allow_env=["CI_*"])
    with pytest.raises(UsageError):
        Policy(allow_commands=["/bin/true"], allow_env=[""])


def test_check_env_under_allow_commands():
    """With command patterns only names matching an allow_env glob (case counts) may be changed; without, any."""
    Policy().check_env([b"LD_PRELOAD"])
    Policy(root=None, execute=True).check_env([b"PYTHONPATH"])
    strict = Policy(allow_commands=["/bin/true"])
    strict.check_env([])
    for name in (b"LD_PRELOAD", b"LD_AUDIT", b"GCONV_PATH", b"PATH"):
        with pytest.raises(DeniedError, match="--allow-env"):
            strict.check_env([name])
    pol = Policy(allow_commands=["/bin/true"], allow_env=["CI_*", "LANG"])
    pol.check_env([b"CI_JOB", b"LANG"])
    for names in ([b"ci_job"], [b"CI_JOB", b"LD_PRELOAD"], [b"LANGUAGE"]):
        with pytest.raises(DeniedError):
            pol.check_env(names)


def test_no_root_parent_costs_nothing(tmp_path):
    """Without a root, parent() hands back (None, path) and open() is os.open."""
    pol = Policy()
    with pol.parent(b"/some/where/x") as (dir_fd, name):
        assert (dir_fd, name) == (None, b"/some/where/x")
    fd = pol.open(b(tmp_path), DIR_FLAGS)
    os.close(fd)


# -- confinement ------------------------------------------------------------------------

def test_paths_inside_the_root_work(tree, resolver):
    """Relative, absolute, '..' that stays inside and symlinks that stay inside all resolve."""
    root, _ = tree
    pol = Policy(root=root)
    for p in (b"a/file", os.path.join(root, b"a/file"), b"a/../a/file", b"link-in/file",
              os.path.join(root, b"link-in/../a/./file")):
        assert read_via(pol, p) == b"inside", p
    assert fsops.stat_kind(b"link-in", pol) == b"d"
    assert fsops.stat_kind(b"nothing", pol) == b""


@pytest.mark.parametrize("path", [
    b"../outside/secret", b"a/../../outside/secret", b"link-out/secret", b"rel-out/secret",
    b"up/outside/secret", b"up", b"/etc/passwd", b"/", b"ROOT/../outside/secret", b"ROOT/a/../../outside/secret",
    b"abs-in/file",  # an absolute symlink is refused even when it points inside
])
def test_paths_leading_out_are_denied(tree, resolver, path):
    """'..', absolute paths and symlinks (relative or absolute) that lead out are denied for open, stat and cwd."""
    root, _ = tree
    path = path.replace(b"ROOT", root)
    pol = Policy(root=root)
    with pytest.raises(DeniedError):
        fsops.open_regular(path, pol)
    with pytest.raises(DeniedError):
        fsops.stat_kind(path, pol)
    with pytest.raises(DeniedError):
        pol.check_cwd(path)


@pytest.mark.parametrize("op", ["send", "copy-dest", "mkdir", "unlink", "remove", "rename-dest", "rename-src"])
def test_operations_through_a_symlink_out_are_denied(tree, resolver, op):
    """Every operation on a path through a symlink pointing out is denied and changes nothing outside."""
    root, outside = tree
    pol = Policy(root=root)
    target = b"link-out/secret" if op in ("unlink", "remove", "rename-src") else b"rel-out/new"
    with pytest.raises(DeniedError):
        if op == "send":
            fsops.create_partial(target, 0o600, pol)
        elif op == "copy-dest":
            fsops.copy_file(b"a/file", target, policy=pol)
        elif op == "mkdir":
            fsops.make_dirs(target + b"/deeper", pol)
        elif op == "unlink":
            fsops.unlink_file(target, pol)
        elif op == "remove":
            fsops.remove_tree(target, pol)
        elif op == "rename-dest":
            fsops.rename_noreplace(b"a/file", target, pol)
        else:
            fsops.rename_noreplace(target, b"a/stolen", pol)
    assert sorted(os.listdir(outside)) == [b"secret"]
    assert os.path.exists(os.path.join(root, b"a", b"file"))


def test_operations_inside_the_root(tree, resolver):
    """mkdir -p, copy, rename, unlink, remove and send work inside the root (a symlink out is removed, not followed)."""
    root, outside = tree
    pol = Policy(root=root)
    fsops.make_dirs(b"new/deep/er", pol)
    fsops.make_dirs(os.path.join(root, b"new/x/../y"), pol)
    assert sorted(os.listdir(os.path.join(root, b"new"))) == [b"deep", b"x", b"y"]
    fsops.copy_file(b"link-in/file", b"new/copy", policy=pol)
    fsops.rename_noreplace(b"new/copy", b"a/moved", pol)
    fsops.unlink_file(b"a/moved", pol)
    part = fsops.create_partial(os.path.join(root, b"new/sent"), 0o600, pol)
    try:
        part.write(b"data")
        part.commit()
    finally:
        part.discard()
    with open(os.path.join(root, b"new/sent"), "rb") as f:
        assert f.read() == b"data"
    fsops.remove_tree(b"link-out", pol)
    fsops.remove_tree(b"new", pol)
    assert sorted(os.listdir(root)) == [b"a", b"abs-in", b"link-in", b"rel-out", b"up"]
    assert os.listdir(outside) == [b"secret"]


def test_the_root_itself_cannot_be_removed_or_renamed(tree, resolver):
    """remove or rename of the root itself is denied (its parent is outside)."""
    root, _ = tree
    pol = Policy(root=root)
    with pytest.raises(DeniedError):
        fsops.remove_tree(root, pol)
    with pytest.raises(DeniedError):
        fsops.rename_noreplace(root, b"a/x", pol)
    with pytest.raises(InvalidRequestError):
        fsops.remove_tree(b".", pol)
    assert os.path.isdir(os.path.join(root, b"a"))


def test_symlink_loop_fails_without_hanging(tree, resolver):
    """A symlink loop inside the root is an ordinary failure, not a hang or a denial."""
    root, _ = tree
    os.symlink(b"loop2", os.path.join(root, b"loop1"))
    os.symlink(b"loop1", os.path.join(root, b"loop2"))
    pol = Policy(root=root)
    with pytest.raises(OSError):
        pol.open(b"loop1/x", os.O_RDONLY)


def test_names_with_nul_are_invalid(tree, resolver):
    """A path with NUL is an invalid request for every entry point of the policy."""
    root, _ = tree
    pol = Policy(root=root)
    with pytest.raises(InvalidRequestError):
        pol.open(b"a/fi\0le", os.O_RDONLY)
    with pytest.raises(InvalidRequestError):
        with pol.parent(b"a/fi\0le"):
            pass
    with pytest.raises(InvalidRequestError):
        pol.check_cwd(b"a\0")
    with pytest.raises(InvalidRequestError):
        with pol.exec_cwd(b"a\0"):
            pass
    with pytest.raises(InvalidRequestError):
        pol.check_execute([b"/bin/t\0rue"], None)


# -- a symlink swapped in during an operation ------------------------------------------

def _swap_out(root: bytes, outside: bytes) -> None:
    """Move root/a aside (to root/a-old) and put a symlink to ``outside`` in its place."""
    os.rename(os.path.join(root, b"a"), os.path.join(root, b"a-old"))
    os.symlink(outside, os.path.join(root, b"a"))


def test_swap_after_parent_resolution_stays_inside(tree, resolver):
    """Once parent() resolved a/, swapping a/ for a symlink out does not move the *at calls outside."""
    root, outside = tree
    pol = Policy(root=root)
    with pol.parent(b"a/new") as (dir_fd, name):
        _swap_out(root, outside)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
        os.close(fd)
        os.unlink(b"file", dir_fd=dir_fd)
    assert sorted(os.listdir(outside)) == [b"secret"]
    assert sorted(os.listdir(os.path.join(root, b"a-old"))) == [b"new"]
    # and a new resolution sees the symlink and refuses
    with pytest.raises(DeniedError):
        fsops.unlink_file(b"a/secret", pol)


def test_swap_during_copy_stays_inside(tree, resolver):
    """A symlink swapped in while copy writes: the copy completes in the directory first resolved, nothing lands outside."""
    root, outside = tree
    pol = Policy(root=root)
    with open(os.path.join(root, b"big"), "wb") as f:
        f.write(b"x" * (fsops.COPY_BLOCK + 1))
    swapped = []

    def swap() -> None:
        if not swapped:
            _swap_out(root, outside)
            swapped.append(1)

    fsops.copy_file(b"big", b"a/copy", policy=pol, tick=swap)
    assert swapped
    assert sorted(os.listdir(outside)) == [b"secret"]
    assert os.path.getsize(os.path.join(root, b"a-old", b"copy")) == fsops.COPY_BLOCK + 1


def test_swap_during_remove_stays_inside(tree, resolver):
    """A symlink swapped in for a directory while remove runs is removed as a link; the outside is untouched."""
    root, outside = tree
    pol = Policy(root=root)
    os.makedirs(os.path.join(root, b"t", b"sub"))
    for i in range(5):
        open(os.path.join(root, b"t", b"sub", b"f%d" % i), "wb").close()
    done = []

    def swap() -> None:
        # at the first entry of t/, replace t/sub by a symlink out
        if not done:
            os.rename(os.path.join(root, b"t", b"sub"), os.path.join(root, b"sub-aside"))
            os.symlink(outside, os.path.join(root, b"t", b"sub"))
            done.append(1)

    fsops.remove_tree(b"t", pol, tick=swap)
    assert done
    assert not os.path.lexists(os.path.join(root, b"t"))
    assert os.listdir(outside) == [b"secret"]


def test_swap_after_exec_cwd_runs_command_inside(tree, resolver):
    """A command started in exec_cwd's directory runs there even if the path became a symlink out after the check."""
    root, outside = tree
    pol = Policy(root=root)
    with pol.exec_cwd(os.path.join(root, b"a")) as cwd:
        _swap_out(root, outside)
        out = subprocess.run(["/bin/pwd", "-P"], cwd=cwd, capture_output=True, timeout=10, check=True)
    assert out.stdout.strip() == os.path.join(root, b"a-old")


# -- cwd ---------------------------------------------------------------------------------

def test_check_cwd(tree, resolver):
    """check_cwd: the real directory inside the root; missing or a file is notfound; outside is denied."""
    root, _ = tree
    pol = Policy(root=root)
    assert pol.check_cwd(os.path.join(root, b"link-in")) == os.path.join(root, b"a")
    assert pol.check_cwd(root) == root
    assert pol.check_cwd(os.path.join(root, b"a/..")) == root
    with pytest.raises(NotFoundError):
        pol.check_cwd(os.path.join(root, b"missing"))
    with pytest.raises(NotFoundError):
        pol.check_cwd(os.path.join(root, b"a/file"))
    with pytest.raises(DeniedError):
        pol.check_cwd(os.path.join(root, b".."))


def test_check_cwd_without_root(tmp_path):
    """Without a root, check_cwd normalises and checks the directory exists, as set_cwd always did."""
    pol = Policy()
    (tmp_path / "x").mkdir()
    assert pol.check_cwd(b(tmp_path / "x" / ".." / "x")) == b(tmp_path / "x")
    with pytest.raises(NotFoundError):
        pol.check_cwd(b(tmp_path / "nope"))


# -- commands ------------------------------------------------------------------------------

def _program(directory: os.PathLike, name: str, text: str = "ok") -> bytes:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho {text}\n")
    os.chmod(path, 0o755)
    return b(path)


def test_no_execute_denies_every_command():
    """execute=False: every command is denied, even one a pattern would allow."""
    pol = Policy(execute=False, allow_commands=["*"])
    with pytest.raises(DeniedError, match="no-execute"):
        pol.check_execute([b"/bin/true"], None)


def test_without_patterns_any_command_may_run():
    """No allow_commands: check_execute returns None (the normal PATH search applies)."""
    assert Policy().check_execute([b"anything"], b"/nowhere") is None
    with pytest.raises(InvalidRequestError):
        Policy().check_execute([], None)


def test_allow_commands_match_after_path_search(tmp_path):
    """A bare name is searched along the command's PATH; the found path must match a pattern, and is what runs."""
    good = tmp_path / "good"
    bad = tmp_path / "bad"
    tool = _program(good, "tool", "good")
    _program(bad, "tool", "bad")
    pol = Policy(allow_commands=[f"{good}/*"])
    path_good_first = b"%s:%s" % (b(good), b(bad))
    path_bad_first = b"%s:%s" % (b(bad), b(good))
    assert pol.check_execute([b"tool"], path_good_first) == tool
    out = subprocess.run([b"tool"], executable=pol.check_execute([b"tool"], path_good_first),
                         capture_output=True, timeout=10)
    assert out.stdout == b"good\n"
    # the first one found is the one that would run: not allowed, whatever comes after
    with pytest.raises(DeniedError, match="matches no"):
        pol.check_execute([b"tool"], path_bad_first)
    with pytest.raises(DeniedError, match="not found"):
        pol.check_execute([b"tool"], b"/nonexistent")
    assert pol.check_execute([tool], None) == tool


def test_allow_commands_never_match_the_bare_name(tmp_path):
    """A pattern naming the bare program does not allow it: a PATH the master chooses could find anything by that name."""
    _program(tmp_path / "bin", "make")
    pol = Policy(allow_commands=["make"])
    with pytest.raises(DeniedError):
        pol.check_execute([b"make"], b(tmp_path / "bin"))


def test_allow_commands_relative_and_symlinked(tmp_path):
    """./prog resolves against the command's cwd; a symlink is allowed by its own path or by its target's."""
    real = _program(tmp_path / "allowed", "prog")
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(real, tmp_path / "elsewhere" / "alias")
    pol = Policy(allow_commands=[f"{tmp_path}/allowed/*"])
    assert pol.check_execute([b"./prog"], None, cwd=b(tmp_path / "allowed")) == real
    assert pol.check_execute([b"alias"], b(tmp_path / "elsewhere")) == real
    pol2 = Policy(allow_commands=[f"{tmp_path}/elsewhere/alias"])
    assert pol2.check_execute([b"alias"], b(tmp_path / "elsewhere")) == b(tmp_path / "elsewhere" / "alias")


def test_allow_commands_skip_directories_and_non_executables(tmp_path):
    """PATH search passes over a directory and a non-executable file of that name, as execvp does."""
    (tmp_path / "d1" / "tool").mkdir(parents=True)
    (tmp_path / "d2").mkdir()
    (tmp_path / "d2" / "tool").write_text("#!/bin/sh\n")
    real = _program(tmp_path / "d3", "tool")
    pol = Policy(allow_commands=[f"{tmp_path}/*"])
    search = b":".join(b(tmp_path / n) for n in ("d1", "d2", "d3"))
    assert pol.check_execute([b"tool"], search) == real


# -- set-ID bits -------------------------------------------------------------------------------

@pytest.mark.parametrize("pol", [Policy(execute=False), Policy(allow_commands=["/bin/true"])],
                         ids=["no-execute", "allow-command"])
def test_any_restricting_policy_drops_set_id_bits(tmp_path, pol):
    """Without a root, --no-execute or --allow-command alone still drop set-ID bits from send and chmod."""
    assert pol.restricted and pol.file_mode(0o6755) == 0o755 and pol.file_mode(0o1777) == 0o1777
    part = fsops.create_partial(b(tmp_path / "sent"), 0o4755, pol)
    try:
        part.write(b"x")
        part.commit()
    finally:
        part.discard()
    assert os.stat(tmp_path / "sent").st_mode & 0o7777 == 0o755
    fsops.chmod(b(tmp_path / "sent"), 0o6750, pol)
    assert os.stat(tmp_path / "sent").st_mode & 0o7777 == 0o750


def test_no_policy_keeps_set_id_bits(tmp_path):
    """A slave without a policy applies the mode as asked, set-ID bits included (its master is trusted)."""
    assert not Policy().restricted
    (tmp_path / "f").write_bytes(b"x")
    fsops.chmod(b(tmp_path / "f"), 0o4755, Policy())
    assert os.stat(tmp_path / "f").st_mode & 0o7777 == 0o4755


def test_check_getenv():
    """getenv is denied under execute=False and allow_commands, allowed with no policy or a root alone."""
    Policy().check_getenv()
    Policy(root=b"/").check_getenv()
    for pol in (Policy(execute=False), Policy(allow_commands=["/bin/true"])):
        with pytest.raises(DeniedError, match="getenv"):
            pol.check_getenv()


def test_a_policy_the_master_would_refuse_is_a_usage_error():
    """Patterns past what a master accepts in a register box (one value, or all policy keys together) fail at once."""
    from remsh.handshake import MAX_POLICY_BYTES, MAX_POLICY_VALUE_LENGTH

    with pytest.raises(UsageError):
        Policy(allow_commands=["/x/" + "a" * MAX_POLICY_VALUE_LENGTH])
    each = "/" + "b" * (MAX_POLICY_VALUE_LENGTH - 5)  # each value fits, both together do not
    assert 2 * len(each) < MAX_POLICY_BYTES < 2 * len(each) + 64
    with pytest.raises(UsageError, match="too long"):
        Policy(allow_commands=[each], allow_env=[each])
    Policy(allow_commands=["/usr/bin/*"] * 100, allow_env=["CI_*"] * 100)
