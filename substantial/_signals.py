"""The signals that end a workflow's coroutine from outside its code.

Raised into the workflow by the engine (cancel, eviction, a lost lease) or
by the workflow's own calls that leave the coroutine (``revert``,
``continue_using``, ``compact``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Cancelled",
    "Compact",
    "ContinueAs",
    "ControlFlow",
    "Evicted",
    "Fenced",
    "Reverted",
]


class ControlFlow(BaseException):
    """Base of the signals that end a workflow's coroutine.

    They derive from BaseException so that ``except Exception`` in workflow
    code cannot swallow them.
    """


class Cancelled(ControlFlow):
    """The run received a cancel request."""


class Reverted(ControlFlow):
    """The workflow called ``revert()`` and its compensations ran."""


class ContinueAs(ControlFlow):
    """The workflow called ``continue_using``."""

    def __init__(self, workflow: str, version: str | None, kwargs: dict[str, Any]) -> None:
        super().__init__(workflow)
        self.workflow = workflow
        self.version = version
        self.kwargs = kwargs


class Compact(ControlFlow):
    """The workflow called ``compact()``: restart it from a snapshot."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("compact")
        self.kwargs = kwargs


class Fenced(ControlFlow):
    """Another worker extended this run's log: stop without writing."""


class Evicted(ControlFlow):
    """The worker is handing the run back: stop at a primitive, write nothing more."""
