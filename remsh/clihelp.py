"""The descriptions ``remsh SUBCOMMAND --help`` shows above its options.

Kept apart from :mod:`remsh.cli` (its parser says which options there are;
this says what each subcommand is for).  A subcommand that sets its own
description keeps it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

#: Subcommand -> its description.
DESCRIPTIONS = {
    "master": "Run a master in the foreground: listeners (--listen, --ssh-listen, --local), the connected "
              "slaves, the job store and the control socket the other commands use.  Logs what happens "
              "(slaves registered, away, refused; jobs started and ended) on stderr or --log-file.  Stops on "
              "SIGTERM or SIGINT; SIGHUP rereads --groups.",
    "ls": "The master's slaves, connected or away.",
    "run": "Run a command on the chosen slaves (all by default), each output line prefixed with the slave's "
           "name.  Exit status: 0 all succeeded, 1 a command failed (one slave: its own status), 2 usage, "
           "3 a slave could not run it, 130 interrupted.",
    "put": "Copy a local file or directory tree to the chosen slaves.  Exit status as for run.",
    "get": "Copy a file or tree from the chosen slaves into LOCALDIR/NAME/.  Exit status as for run.",
    "host-key": "Print an SSH host key's fingerprint and the known_hosts line slaves need to trust the "
                "master's embedded SSH server.",
}


def describe(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Give each subcommand of ``sub`` without a description its own."""
    for name, parser in sub.choices.items():
        if not parser.description and name in DESCRIPTIONS:
            parser.description = DESCRIPTIONS[name]


class OneLineParser(argparse.ArgumentParser):
    """An option argparse refuses is one line on stderr and exit 2, like
    every other usage error of ``remsh`` (not the whole usage block, which
    ``--help`` shows): ``remsh: MESSAGE (remsh run --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"remsh: {message} ({self.prog} --help)\n")
