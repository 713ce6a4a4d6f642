"""``python -m remsh.slave``: the ``remsh-slave`` program (see :mod:`remsh.slave.main`),
for a machine where the console script is not on ``PATH``."""

import sys

from remsh.slave.main import main

if __name__ == "__main__":
    sys.exit(main())
