"""Argument types of the command lines (``remsh``, ``remsh-slave``) for
values where 0 (or less) means nothing: a usage error, exit 2, naming the
option, instead of a slave that redials in a tight loop or a timeout that
never waits."""

from __future__ import annotations

import argparse
import math


def positive_seconds(text: str) -> float:
    """A number of seconds above 0 (``--connect-timeout``, ``--heartbeat``, ``--max-backoff``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def positive_count(text: str) -> int:
    """A whole number of at least 1 (``--spool-limit`` bytes and the like)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 1 to 65535 (a port to dial: 0 is no port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value
