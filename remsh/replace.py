"""Replacing what is there: ``remsh put --force``/``--parents`` and
``remsh get --force``.

A slave never has a file or a tree replaced by ``Slave.send`` or
``Slave.send_tree`` (both refuse an existing destination), and
``Slave.fetch``/``fetch_tree`` never replace a local one.  With
``--force`` the new copy is first made complete *beside* the destination
(under a hidden temporary name, verified as any transfer), then the old one
is moved aside, the new one moved into its place, and the old one removed.
So the destination is never partial: it is the old copy or the new one
(between the two renames, for a moment, neither).  When the second rename
fails, the old copy is put back.  A transfer that fails leaves the old
copy alone and nothing beside it.

Rejected: ``rename(2)`` over the old file alone.  The slave protocol's
rename never replaces (a slave never loses a file to a rename by
mistake), and no rename replaces a non-empty directory.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
from typing import Callable, Optional, Tuple

from remsh.errors import LocalError, RemshError
from remsh.master.slave import Slave


def hidden_beside(path: str, what: str, local: bool = False) -> str:
    """A hidden name in the directory of ``path`` (on the slave, or
    ``local``) for a ``what`` copy of it."""
    split, join = (os.path.split, os.path.join) if local else (posixpath.split, posixpath.join)
    head, tail = split(path.rstrip("/"))
    return join(head, f".{tail}.remsh-{what}-{secrets.token_hex(4)}")


def holding_directory(dest: str, into: bool = False) -> str:
    """The directory that should hold ``dest`` on the slave: its parent, or,
    ``into`` (a file put to ``DIR/``, which goes into ``DIR``), ``dest``
    itself; ``""`` for none."""
    return dest.rstrip("/") if into else posixpath.dirname(dest.rstrip("/"))


def make_parents(slave: Slave, dest: str, into: bool = False) -> None:
    """``put --parents``: make the directories that should hold ``dest``
    (see :func:`holding_directory`)."""
    parent = holding_directory(dest, into)
    if parent and slave.stat(parent) is None:
        slave.mkdir(parent)


def missing_directory(slave: Slave, dest: str, into: bool = False) -> Optional[str]:
    """The directory that should hold ``dest``, when the slave says it does
    not exist (to hint ``put --parents`` after a failed put); else None."""
    parent = holding_directory(dest, into)
    try:
        return parent if parent and slave.stat(parent) is None else None
    except RemshError:  # the slave cannot say: no hint
        return None


def put_replacing(slave: Slave, target: str, send: Callable[[str], None]) -> bool:
    """``put --force``: ``send(path)`` the new copy beside ``target`` on
    the slave, then put it in ``target``'s place (see the module
    docstring).  Returns True when something was replaced."""
    if slave.stat(target) is None:
        send(target)
        return False
    new = hidden_beside(target, "new")
    try:
        send(new)
    except BaseException:
        _quietly(lambda: slave.remove(new))
        raise
    old = hidden_beside(target, "old")
    try:
        slave.rename(target, old)
    except BaseException:
        _quietly(lambda: slave.remove(new))
        raise
    try:
        slave.rename(new, target)
    except BaseException:
        _quietly(lambda: slave.rename(old, target))
        _quietly(lambda: slave.remove(new))
        raise
    slave.remove(old)
    return True


def get_directory(name: str, localdir: str, base: str) -> Tuple[str, bool, str]:
    """Where ``get`` puts what it fetches from slave ``name``:
    ``localdir/NAME/`` (made here), whether it was made now (to be removed
    again by a get that fails), and the target ``localdir/NAME/base``.

    :raises LocalError: a slave name that cannot name a directory, or the
        directory cannot be made
    """
    if name in (".", "..") or "/" in name or "\0" in name:
        raise LocalError(f"{name}: get: the slave's name cannot be a local directory name")
    mine = os.path.join(localdir, name)
    made = not os.path.isdir(mine)
    try:
        os.makedirs(mine, exist_ok=True)
    except OSError as e:
        raise LocalError(f"{name}: get: cannot make {mine}: {e.strerror or e}") from e
    return mine, made, os.path.join(mine, base)


def get_replacing(target: str, fetch: Callable[[str], None], force: bool) -> bool:
    """``get``: ``fetch(path)`` into ``target`` on this machine; with
    ``force`` an earlier copy there is replaced (see the module
    docstring).  Returns True when something was replaced.

    :raises LocalError: ``target`` exists and ``force`` is false
    """
    if not os.path.lexists(target):
        fetch(target)
        return False
    if not force:
        raise LocalError(f"get: {target} exists (get --force replaces it)")
    new = hidden_beside(target, "new", local=True)
    fetch(new)  # a failed fetch leaves nothing (Slave.fetch, fetch_tree)
    try:
        if not os.path.isdir(target) or os.path.islink(target):
            if os.path.isdir(new):
                old = hidden_beside(target, "old", local=True)
                os.rename(target, old)
                os.rename(new, target)
                os.unlink(old)
            else:
                os.replace(new, target)  # a file over a file: one atomic rename
            return True
        old = hidden_beside(target, "old", local=True)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return True
    except OSError as e:
        _remove_local(new)
        raise LocalError(f"get: cannot put the new copy in place of {target}: {e.strerror or e}") from e


def _remove_local(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def _quietly(fn: Callable[[], object]) -> Optional[BaseException]:
    """Call ``fn`` as part of a clean-up: its failure is returned, not raised
    (the first error is the one to report)."""
    try:
        fn()
    except (RemshError, OSError) as e:
        return e
    return None
