"""``remsh ls [-t PATTERN]... [--where KEY=GLOB]... [--json]``: the master's slaves.

One line per slave under a header (name, transport, peer, since, platform,
python, remsh, state; and master, the master holding the slave, when the
master shares its job store with others: :mod:`remsh.slaveregistry`), or with ``--json`` an array of objects with those
fields and more: ``hostname``, ``basedir``, the slave's policy (``root``,
``no_execute``, ``allow_command``), ``job``, the id of the job it runs
now, and ``master`` on a shared store.  ``-t`` (globs and ``@GROUP``) and ``--where`` choose as for ``run``,
away slaves included; a choice that matches nothing lists nothing (exit 0),
an unknown group or fact is exit 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional

from remsh.choice import ls_row
from remsh.clijobs import error
from remsh.control import ControlClient, ControlError, control_path
from remsh.controlproto import EVENTS
from remsh.fleet import EXIT_OK, EXIT_SLAVE_FAILED, EXIT_USAGE
from remsh.lineprinter import printable

#: The columns of ``remsh ls``, in order.
LS_FIELDS = ("name", "transport", "peer", "since", "platform", "python", "remsh", "state")
#: The fields of ``remsh ls --json``.
LS_JSON_FIELDS = tuple(key.name for key in EVENTS["slave"])


def add_ls_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The ``ls`` subcommand."""
    ls = sub.add_parser("ls", help="list the master's slaves",
                        description="The master's slaves, connected or away: name, transport, peer, since, "
                                    "platform, python, remsh, state (idle, busy, away, resuming).")
    ls.add_argument("-t", "--target", action="append", default=[], metavar="PATTERN",
                    help="slaves whose name matches this glob, or @GROUP (repeatable; default: all)")
    ls.add_argument("--where", action="append", default=[], metavar="KEY=GLOB",
                    help="slaves whose registration fact matches (repeatable; all must hold)")
    ls.add_argument("--json", action="store_true",
                    help="a JSON array; also hostname, basedir, root, no_execute, allow_command and job")


def cmd_ls(args: argparse.Namespace) -> int:
    """``remsh ls``: exit 0, 2 (no master, a bad choice) or 3 (lost the master)."""
    path, _ = control_path(args.master)
    rows: List[Dict[str, Optional[Any]]] = []
    try:
        client = ControlClient(path)
        try:
            client.request("ls", targets=getattr(args, "target", []), where=getattr(args, "where", []))
            for ev in client.decoded():
                if ev.kind == "slave":
                    rows.append(ls_row(ev.values, LS_JSON_FIELDS))
                elif ev.kind == "fail":
                    error(ev.get("message", ""))
                    return int(ev.get("exit", EXIT_USAGE))
        finally:
            client.close()
    except ControlError as e:
        error(str(e))
        return e.exit
    except OSError as e:
        error(f"lost the master: {e.strerror or e}")
        return EXIT_SLAVE_FAILED
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    # every cell is the slave's word: escaped, so that a platform string
    # cannot retitle or clear the operator's terminal
    # a master sharing its store with others: which one holds each slave
    fields = LS_FIELDS + ("master",) if any(row.get("master") for row in rows) else LS_FIELDS
    table = [list(fields)] + [[printable(str(row.get(f) or "-")) for f in fields] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(fields))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return EXIT_OK
