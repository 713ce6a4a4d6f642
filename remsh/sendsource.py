"""The local ends of ``send`` and ``fetch`` for both drivers (the threaded
master's :mod:`remsh.master.sendfile` / :mod:`remsh.master.fetchfile` and
:mod:`remsh.aio`): ``send``'s source opened, or the caller's file object
taken as it is, with its size for the progress callback when it can be
known; ``fetch``'s destination as a partial file beside it."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from typing import IO, Any, BinaryIO, Iterator, Optional, Tuple, Union

from remsh.conversation import PathArg
from remsh.errors import LocalError
from remsh.files import PartialFile


@contextmanager
def send_source(name: str, src: Union[PathArg, BinaryIO], want_size: bool) -> Iterator[Tuple[IO[bytes], Optional[int]]]:
    """``(file, size)`` for the ``send`` of slave ``name``: a path is opened
    (and closed again after), a file object is used as it is; ``size`` is
    ``None`` unless ``want_size`` and the file can tell.

    :raises LocalError: the path cannot be opened
    """
    if hasattr(src, "read"):
        f: IO[bytes] = src  # type: ignore[assignment]
        own = False
    else:
        try:
            f = open(src, "rb", buffering=0)
        except OSError as e:
            raise LocalError(f"{name}: send: cannot open local file: {e}") from e
        own = True
    try:
        size: Optional[int] = None
        if want_size:
            try:
                size = os.fstat(f.fileno()).st_size
            except (OSError, AttributeError, io.UnsupportedOperation):
                size = None
        yield f, size
    finally:
        if own:
            f.close()


def fetch_target(name: str, dest: Union[PathArg, BinaryIO]) -> Tuple[Any, Optional[PartialFile]]:
    """Where the ``fetch`` of slave ``name`` writes: the caller's file
    object as it is, or a partial file beside the path ``dest`` (the second
    item: commit or discard it), which must not exist.

    :raises LocalError: ``dest`` exists or its partial file cannot be made
    """
    if hasattr(dest, "write"):
        return dest, None
    dest_b = os.fsencode(dest)
    if os.path.lexists(dest_b):
        raise LocalError(f"{name}: fetch: local destination exists: {os.fsdecode(dest_b)}")
    try:
        part = PartialFile(dest_b)
    except OSError as e:
        raise LocalError(f"{name}: fetch: cannot create local file: {e}") from e
    return part, part


def place_fetched(name: str, part: PartialFile) -> None:
    """Put the file ``fetch`` of slave ``name`` wrote in place, never over
    one that appeared meanwhile.

    :raises LocalError: it appeared meanwhile, or the move failed
    """
    try:
        part.commit()
    except FileExistsError:
        raise LocalError(f"{name}: fetch: local destination appeared meanwhile") from None
    except OSError as e:
        raise LocalError(f"{name}: fetch: cannot place local file: {e}") from e
