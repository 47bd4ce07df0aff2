"""Queue names and the options of a start into a queue: checks with no dependencies.

Shared by the client (:mod:`substantial.queues`) and the workflow context
(``c.start_child(..., queue=...)``), which must not import the queue machinery.
"""

from __future__ import annotations

import re
from typing import Any

from substantial.errors import InvalidArgument

__all__ = ["check_key_priority", "queue_run_id"]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,99}")


def queue_run_id(name: str) -> str:
    """Return the id of the run that is the queue ``name``, checking the name."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid queue name {name!r}: use 1-100 characters from A-Z a-z 0-9 _ . = -, "
            "not starting with '.', '=' or '-'"
        )
    return f"queue:{name}"


def check_key_priority(key: Any, priority: Any) -> None:
    """Refuse a ``key=`` that is not a non-empty string, a ``priority=`` not a whole number."""
    if key is not None and (not isinstance(key, str) or not key):
        raise InvalidArgument(f"key= takes a non-empty string, got {key!r}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise InvalidArgument(f"priority= takes a whole number, got {priority!r}")
