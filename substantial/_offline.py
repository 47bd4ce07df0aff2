"""Replay a log against code offline: nothing runs, nothing is written.

What a worker does after a crash, without the worker: the replay checker,
run surgery's checks and :func:`substantial.testing.replay` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from substantial._live import Driver
from substantial._outcome import end_of
from substantial._repair import effective
from substantial.backends.memory import MemoryBackend
from substantial.context import Context
from substantial.errors import InvalidArgument
from substantial.records import Record, decode_entry, decode_log
from substantial.replay import Execution
from substantial.workflow import Workflow

__all__ = ["Replayed", "replay"]


@dataclass
class Replayed:
    """What replaying a log against code gave.

    ``end`` is the end record the code arrives at (None if the log stops
    while the workflow still waits); ``matches`` tells whether it equals the
    end the log recorded (True when the log has none).
    """

    end: Record | None
    recorded_end: Record | None

    @property
    def matches(self) -> bool:
        """Tell whether the replay ended as the log did."""
        if self.recorded_end is None:
            return True
        if self.end is None:
            return False
        return _same_end(self.end, self.recorded_end)


def _same_end(a: Record, b: Record) -> bool:
    keys = ("status", "value", "next")
    return all(a.get(k) == b.get(k) for k in keys) and (
        (a.get("error") or {}).get("type") == (b.get("error") or {}).get("type")
    )


async def replay(wf: Workflow[Any], entries: list[bytes] | list[list[Record]]) -> Replayed:
    """Replay a run's log against ``wf`` without running any step or writing anything.

    ``entries`` are the log's entries as stored (bytes) or decoded. Raises
    :class:`~substantial.NonDeterminismError` (naming the command, the
    recorded and the requested primitive) if the code diverges from the log.
    """
    if all(isinstance(entry, bytes) for entry in entries):
        records = decode_log("replay", 0, entries)  # type: ignore[arg-type]
    else:
        records = [
            (position, dict(r))  # type: ignore[call-overload]
            for position, entry in enumerate(entries)
            for r in (
                decode_entry("replay", position, entry) if isinstance(entry, bytes) else entry
            )
        ]
    records = effective(records)[0]
    if not records or records[0][1]["k"] != "start":
        raise InvalidArgument("replay() needs a log that begins with its start record")
    start = records[0][1]
    recorded_end = records[-1][1] if records[-1][1]["k"] == "end" else None
    body = records[1:-1] if recorded_end is not None else records[1:]
    run_id = str(start.get("run_id", "replay"))
    x = Execution(run_id, body, len(entries), started_at=float(start["at"]))
    ctx = Context(x, run_id)
    driver = Driver(
        x, MemoryBackend(), _NoEffects(), executor=None, idle_timeout=0.0, deadline=None
    )
    kwargs = dict(start["kwargs"])
    try:
        await driver.run(lambda: wf.fn(ctx, **kwargs), live=False)
        if x.failure is not None:
            raise x.failure
        assert x.main is not None
        end = end_of(x).end if x.main.done() else None
    finally:
        x.stop()
    return Replayed(end, recorded_end)


class _NoEffects:
    async def start_child(self, x: Execution, command: Any) -> str:
        raise AssertionError("a replay never starts children")

    async def send(self, run_id: str, event_id: str, name: str, value: Any) -> None:
        raise AssertionError("a replay never sends events")

    async def publish(self, x: Execution) -> None:
        raise AssertionError("a replay never publishes")
