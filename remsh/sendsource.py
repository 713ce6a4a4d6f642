"""The local side of ``send`` for both drivers (the threaded master's
:mod:`remsh.master.sendfile` and :mod:`remsh.aio`): the source opened, or
the caller's file object taken as it is, and its size for the progress
callback when it can be known."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from typing import IO, BinaryIO, Iterator, Optional, Tuple, Union

from remsh.conversation import PathArg
from remsh.errors import LocalError


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
