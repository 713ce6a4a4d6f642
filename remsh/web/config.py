"""Where and how the dashboard listens (shared by the options and the server)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """Where and how the dashboard listens."""

    host: str
    port: int
    #: ``(certificate file, key file)`` for HTTPS, or ``None``
    tls: Optional[Tuple[str, str]] = None
    insecure: bool = False
