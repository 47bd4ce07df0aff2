"""A store seen through a payload codec: values are sealed on the way in, opened on the way out.

The engine and the backend below know nothing of it: the log entries,
inbox events and run metadata that pass through have their value fields
replaced by sealed objects (:func:`substantial.codecs.seal`). Everything
else (leases, the due index) goes straight through. Values written before
a codec was set stay readable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from substantial.backends.base import Backend, DueRuns, Event, Lease, NewEvent, RunInfo
from substantial.codecs import Codec, CodecError, seal, unseal
from substantial.errors import CorruptRecord

__all__ = ["CodecBackend"]

#: Per record kind, the fields that hold the workflow's own values.
VALUE_FIELDS: dict[str, tuple[str, ...]] = {
    "start": ("kwargs",),
    "step": ("value",),
    "event": ("value",),
    "publish": ("value",),
    "emit": ("value",),
    "end": ("value",),
    "log": ("data",),
    "snapshot": ("kwargs", "keys", "published", "mailbox"),
}


def _records(fn: Callable[[Any], Any], entry: bytes) -> bytes:
    records = orjson.loads(entry)
    if not isinstance(records, list):
        return entry  # not ours to judge: the engine reports a corrupt entry
    for record in records:
        if not isinstance(record, dict):
            continue
        for name in VALUE_FIELDS.get(record.get("k"), ()):  # type: ignore[arg-type]
            if name in record:
                record[name] = fn(record[name])
        start = record.get("start")  # a snapshot carries the run's start record
        if record.get("k") == "snapshot" and isinstance(start, dict) and "kwargs" in start:
            start["kwargs"] = fn(start["kwargs"])
    return orjson.dumps(records)


class CodecBackend(Backend):
    """``inner`` with every value passing through ``codec``."""

    def __init__(self, inner: Backend, codec: Codec) -> None:
        super().__init__()
        self.inner = inner
        self.codec = codec
        self.waker = inner.waker
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _seal(self, value: Any) -> Any:
        return seal(self.codec, value)

    def _open(self, value: Any) -> Any:
        return unseal(self.codec, value)

    def _info_in(self, info: RunInfo) -> RunInfo:
        published = (
            {k: self._seal(v) for k, v in info.published.items()} if info.published else None
        )
        output = self._seal(info.output) if info.output is not None else None
        return dataclasses.replace(info, output=output, published=published)

    def _info_out(self, info: RunInfo | None) -> RunInfo | None:
        if info is None:
            return None
        published = (
            {k: self._open(v) for k, v in info.published.items()} if info.published else None
        )
        return dataclasses.replace(info, output=self._open(info.output), published=published)

    def _event_in(self, data: bytes) -> bytes:
        body = orjson.loads(data)
        if isinstance(body, dict) and "value" in body:
            body["value"] = self._seal(body["value"])
        return orjson.dumps(body)

    def _event_out(self, event: Event) -> Event:
        try:
            body = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return event  # the engine reports a malformed event
        if isinstance(body, dict) and "value" in body:
            body["value"] = self._open(body["value"])
        return dataclasses.replace(event, data=orjson.dumps(body))

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Append with values sealed."""
        await self.inner.append(run_id, position, _records(self._seal, entry))

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Read with values opened; an entry that does not open is a corrupt record."""
        out: list[bytes] = []
        for position, entry in enumerate(await self.inner.read_log(run_id, start), start):
            try:
                out.append(_records(self._open, entry))
            except CodecError as exc:
                raise CorruptRecord(run_id, position, str(exc)) from exc
            except orjson.JSONDecodeError:
                out.append(entry)  # the engine reports it, with the run and position
        return out

    # -- inbox and due index ------------------------------------------------

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Acknowledge as the store does; read events with their values opened."""
        try:
            return [self._event_out(e) for e in await self.inner.read_inbox(run_id, ack=ack)]
        except CodecError as exc:
            raise CorruptRecord(run_id, "inbox", str(exc)) from exc

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Set the due time as the store does, with the event's value sealed."""
        if event is not None:
            event = NewEvent(event.event_id, self._event_in(event.data))
        return await self.inner.set_due(run_id, at, event=event)

    async def unschedule_idle(self, run_id: str) -> bool:
        """Unschedule unless an event waits, as the store does."""
        return await self.inner.unschedule_idle(run_id)

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """List due runs, as the store does."""
        return await self.inner.due(now, limit)

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read or take a lease, as the store does."""
        return await self.inner.lease(run_id, owner, ttl, take_from=take_from)

    # -- metadata -----------------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Store metadata with the result and published values sealed."""
        await self.inner.put_run(self._info_in(info))

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """List metadata with values opened."""
        found = await self.inner.list_runs(
            status=status, workflow=workflow, limit=limit, after=after, ids=ids
        )
        return self._opened(found)

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """List newest first from the store's own index, values opened."""
        found = await self.inner.list_recent(
            status=status, workflow=workflow, limit=limit, before=before
        )
        return self._opened(found)

    def _opened(self, found: list[RunInfo]) -> list[RunInfo]:
        out: list[RunInfo] = []
        for info in found:
            try:
                opened = self._info_out(info)
            except CodecError as exc:  # one run that does not open never hides the others
                # Where the store's index placed it: a page's last run is its cursor.
                flagged = RunInfo.unreadable(info.run_id, str(exc))
                opened = dataclasses.replace(flagged, created_at=info.created_at)
            if opened is not None:
                out.append(opened)
        return out

    async def delete(self, run_id: str) -> bool:
        """Delete the run from the store (nothing to open)."""
        return await self.inner.delete(run_id)

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait on the store's own wake-up signal."""
        return await self.inner.wait_for_work(timeout)

    async def close(self) -> None:
        """Close the store."""
        await self.inner.close()

    def describe(self) -> str:
        """Name the store and the codec."""
        return f"{self.inner.describe()} (values through codec {self.codec.name!r})"
