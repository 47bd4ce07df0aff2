"""What a forked child must not share with its parent: each holder resets itself in the child.

A lock on an open file, a thread: a child forked from a process that writes
to a database must open its own and start its own. Holders register here
once, instead of asking ``os.getpid()`` on every write.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["ResetInChild", "reset_in_child"]


class ResetInChild(Protocol):
    """An object that forgets, in a forked child, what belongs to the parent."""

    def after_fork(self) -> None:
        """Forget (never close) what the parent holds."""


_HOLDERS: weakref.WeakSet[ResetInChild] = weakref.WeakSet()


def reset_in_child(holder: ResetInChild) -> None:
    """Call ``holder.after_fork()`` in every child this process forks from now on."""
    _HOLDERS.add(holder)


def _after_fork_in_child() -> None:
    for holder in list(_HOLDERS):
        holder.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
