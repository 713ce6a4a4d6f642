"""``python -m remsh``: the ``remsh`` master program (see :mod:`remsh.cli`)."""

import sys

from remsh.cli import main

if __name__ == "__main__":
    sys.exit(main())
