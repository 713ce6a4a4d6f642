"""The slave side: the server that performs operations, and ``remsh-slave``."""
