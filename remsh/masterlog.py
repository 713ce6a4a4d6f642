"""What ``remsh master`` says it does: its log.

By default the master logs one line for each thing an operator wants to
know, on standard error: where it listens, its control socket, ``ready``;
a slave registered, away, back, lost or gone; a slave refused, with the
reason (failed authentication, an SSH key not authorised, a name held by
another listener); a job started and ended; the groups reread on SIGHUP.
Warnings and errors always.  ``-v`` adds every informational line, ``-vv``
the debugging ones.

- ``--log-file FILE``: the lines go to ``FILE`` (appended; made mode 0600)
  instead of standard error, each with its UTC time;
- ``--log-format json``: one JSON object a line: ``time`` (UTC, ISO 8601),
  ``level``, ``logger``, ``message``.

Text lines are escaped with :func:`~remsh.lineprinter.printable`: they may
quote what a slave sent (a name it tried).  paramiko's own ERROR lines for
SSH clients that fail to connect (a bad banner, a refused key, a client
that hangs up) are not shown below ``-vv``: the listener logs its own line
for each refusal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Optional, TextIO

from remsh.lineprinter import printable
from remsh.tlshints import MASTER_HINTS

#: The logger of the master's own lines (listening, ready, stopping).
ANNOUNCE = "remsh.masterlog"
#: Loggers whose informational lines the master shows by default: what
#: happens to slaves and jobs.
EVENT_LOGGERS = ("remsh.master.slavelistener", "remsh.master.slavecollection", "remsh.jobs", "remsh.fleet",
                 "remsh.groups", "remsh.transports.ssh", ANNOUNCE)
#: paramiko's loggers: its own, and the channel the embedded SSH server
#: gives its transports (``remsh.transports.ssh.PARAMIKO_LOGGER``).
PARAMIKO = ("paramiko", "remsh.transports.ssh.paramiko")


class PrintableFormatter(logging.Formatter):
    """Log lines with the message escaped by :func:`printable`: the master
    logs what slaves send (names they tried, their error texts) to the
    operator's terminal.  A traceback after the line keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time``, ``level``, ``logger``, ``message``
    (and ``traceback`` when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj)


#: Hints added to the master's lines: (what the line holds, the hint).
HINTS = MASTER_HINTS + (
    (("refused slave", "failed authentication"),
     " (a wrong proof: not the master's secret, or a name the master has no secret for)"),
)


#: An IPv4 address as a dual-stack socket gives it: ``[::ffff:127.0.0.1]``.
MAPPED = re.compile(r"\[::ffff:(\d{1,3}(?:\.\d{1,3}){3})\]", re.IGNORECASE)


def with_hint(message: str) -> str:
    """``message`` with IPv4-mapped addresses shown plain, and the hint of
    :data:`HINTS` it matches, if any."""
    message = MAPPED.sub(r"\1", message)
    for needles, hint in HINTS:
        if all(n in message for n in needles):
            return message + hint
    return message


class EventFilter(logging.Filter):
    """Lets through warnings and errors, the informational lines of
    :data:`EVENT_LOGGERS`, and everything at ``verbose`` 1 (informational)
    or 2 (debugging); paramiko's connection errors only at 2."""

    def __init__(self, verbose: int) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == n or record.name.startswith(n + ".") for n in PARAMIKO):
            return self.verbose >= 2
        shown = record.levelno >= logging.WARNING or self.verbose >= 2 or (
            record.levelno >= logging.INFO and (self.verbose >= 1 or any(
                record.name == n or record.name.startswith(n + ".") for n in EVENT_LOGGERS)))
        if shown:
            message = record.getMessage()
            hinted = with_hint(message)
            if hinted != message:
                record.msg, record.args = hinted, ()
        return shown


def add_log_options(p: argparse.ArgumentParser) -> None:
    """``remsh master``'s ``--log-file`` and ``--log-format``."""
    g = p.add_argument_group("logging")
    g.add_argument("--log-file", metavar="FILE",
                   help="write the log to FILE (appended, made 0600) instead of stderr, each line with its time")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines, or one JSON object a line: time, level, logger, message (default: text)")


def open_log_file(path: str) -> TextIO:
    """``path`` opened for appending, made mode 0600 when new.

    :raises OSError: it cannot be opened
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)


def configure(args: argparse.Namespace) -> Optional[str]:
    """Set up the master's log as ``args`` says (``verbose``, ``log_file``,
    ``log_format``); returns why the log file cannot be used, or ``None``."""
    stream: TextIO = sys.stderr
    problem = None
    if getattr(args, "log_file", None):
        try:
            stream = open_log_file(args.log_file)
        except OSError as e:
            problem = f"cannot open the log file {args.log_file}: {e.strerror or e}"
    handler = logging.StreamHandler(stream)
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonFormatter())
    elif stream is sys.stderr:
        handler.setFormatter(PrintableFormatter("remsh master: %(message)s"))
    else:
        handler.setFormatter(PrintableFormatter("%(asctime)s remsh master: %(message)s", "%Y-%m-%dT%H:%M:%SZ"))
        handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    verbose = int(getattr(args, "verbose", 0) or 0)
    handler.addFilter(EventFilter(verbose))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
    for name in PARAMIKO:  # not even formatted below -vv
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    return problem


def announce(text: str) -> None:
    """One line of the master's own (listening, ready, stopping)."""
    logging.getLogger(ANNOUNCE).info("%s", text)

