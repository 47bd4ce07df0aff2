"""Storage backends, and :func:`from_url` to build one from a URL.

Each URL scheme is opened by the backend registered for it: the built-in
ones, :func:`register_backend`, or a package's ``substantial.backends``
entry point (see ``substantial/backends/_registry.py``).
"""

from __future__ import annotations

from substantial.backends._redact import redact_url
from substantial.backends._registry import (
    ENTRY_POINT_GROUP,
    from_url,
    known_schemes,
    register_backend,
)
from substantial.backends.base import Backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backend",
    "from_url",
    "known_schemes",
    "redact_url",
    "register_backend",
]
