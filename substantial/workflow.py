"""The ``@workflow`` decorator."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from substantial.backends.base import validate_id
from substantial.errors import InvalidArgument

if TYPE_CHECKING:
    from substantial.context import Context

__all__ = ["Workflow", "workflow"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Workflow(Generic[R]):
    """A registered-able workflow: an ``async def f(c: Context, **kwargs)`` with a name.

    ``version`` pins runs to code: a run started on version ``"2"`` is only
    replayed by a worker that registered version ``"2"`` of this workflow.
    """

    fn: Callable[..., Awaitable[R]]
    name: str
    version: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """Return the registry key ``(name, version)``."""
        return (self.name, self.version)

    def __call__(self, c: Context, /, *args: Any, **kwargs: Any) -> Awaitable[R]:
        """Call the underlying function (what the engine does on every replay)."""
        return self.fn(c, *args, **kwargs)


@overload
def workflow(fn: Callable[..., Awaitable[R]], /) -> Workflow[R]: ...


@overload
def workflow(
    *, name: str | None = None, version: str | int | None = None
) -> Callable[[Callable[..., Awaitable[R]]], Workflow[R]]: ...


def workflow(
    fn: Callable[..., Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    version: str | int | None = None,
) -> Workflow[R] | Callable[[Callable[..., Awaitable[R]]], Workflow[R]]:
    """Declare an ``async def`` taking a :class:`Context` as a durable workflow.

    Use as ``@workflow()`` or ``@workflow(name="billing", version=2)``. The
    name defaults to the function's name and is what the log records, so
    renaming the function does not orphan runs in flight if ``name`` is kept.
    """

    def wrap(f: Callable[..., Awaitable[R]]) -> Workflow[R]:
        if not inspect.iscoroutinefunction(f):
            raise InvalidArgument(
                f"@workflow needs an `async def` function, got {f!r}: "
                "declare it as `async def name(c: Context, ...)`"
            )
        wf_name = validate_id("workflow name", name or f.__name__)
        return Workflow(fn=f, name=wf_name, version=None if version is None else str(version))

    if fn is not None:
        return wrap(fn)
    return wrap
