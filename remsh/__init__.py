"""remsh: run commands and move files on many machines from one master process."""

__version__ = "0.1.0"
