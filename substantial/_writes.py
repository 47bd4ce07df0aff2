"""How a run's driver writes its log: one entry per batch, retried through outages.

The write path of :class:`substantial._live.Driver`, kept apart from the
driving: every write lands at the run's next position or not at all, a
store that refuses writes is waited out without running any step again,
and a position taken by another writer means the lease was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random

from substantial import _clock
from substantial._durations import MAX_SECONDS
from substantial._effects import Effects
from substantial.backends.base import Backend
from substantial.errors import BackendUnavailable, InvalidArgument, PositionTaken
from substantial.records import Record, decode_entry, encode_entry
from substantial.replay import Execution, Fenced

__all__ = ["WRITE_RETRY_FIRST", "WRITE_RETRY_MAX", "LogWriter"]

logger = logging.getLogger("substantial.workflow")

#: The first and the longest pause between tries of a log write the store refused.
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_MAX = 10.0


class LogWriter:
    """The write path of a run's driver (a base class of :class:`~substantial._live.Driver`)."""

    x: Execution
    backend: Backend
    effects: Effects
    #: Set when another worker holds the lease: write nothing more.
    lost: bool
    stop_requested: bool
    _stopping: asyncio.Event

    async def flush(self, *extra: Record) -> None:
        """Write what is buffered (and ``extra``) as one entry at the next position."""
        x = self.x
        self._refuse_endless_timers()
        batch = [*x.pending, *extra] if extra else x.pending
        if not batch:
            if x.to_ack and not self.lost:
                # Recorded before (a crash, a lost lease), never acknowledged: no write will
                # carry the ack, and an event left in the inbox keeps the run due forever.
                acked, x.to_ack = x.to_ack, []
                try:
                    await self.backend.ack_events(x.run_id, acked)
                except BackendUnavailable:
                    x.to_ack[:0] = acked
            return
        if self.lost:
            raise Fenced("the lease was lost")
        entry = encode_entry(batch)
        try:
            await self.backend.append(x.run_id, x.position, entry)
        except PositionTaken as exc:
            raise Fenced(str(exc)) from exc
        except BackendUnavailable as exc:
            await self._append(entry, exc)
        x.position += 1
        x.pending = []
        x.sleeps_pending = False
        if x.to_ack:
            acked, x.to_ack = x.to_ack, []
            try:
                await self.backend.ack_events(x.run_id, acked)
            except BackendUnavailable:
                if extra:  # the end: the run stays due, and is finished anew
                    raise
                x.to_ack[:0] = acked  # cleanup only: done with the next write
        if x.publish_dirty:
            x.publish_dirty = False
            await self.effects.publish(x)

    async def _append(self, entry: bytes, failed: BackendUnavailable) -> None:
        """Write ``entry`` at the run's next position, which the store just ``failed`` to take.

        A full disk or an outage fails the write with BackendUnavailable. Giving the run
        up would replay it and run again, at once, every step whose completion is not
        written yet; so the completions stay here and the write is retried with capped
        exponential backoff and jitter, until it lands, the lease is lost or the worker
        stops. A try whose reply was lost may have landed: each retry first reads the
        position back, and goes on if it holds this entry (were the run given up instead,
        its steps still running would be cut off and run again).
        """
        x = self.x
        pause, failures = WRITE_RETRY_FIRST, 0
        while True:
            if self.lost:
                raise Fenced("the lease was lost") from failed
            if self.stop_requested:
                raise failed
            failures += 1
            if failures == 1:
                logger.warning(
                    "run %s: its log cannot be written (%s); retrying with backoff up to "
                    "%.0fs apart, its steps are not run again meanwhile",
                    x.run_id,
                    failed,
                    WRITE_RETRY_MAX,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause * random.uniform(0.5, 1.0)):
                    await self._stopping.wait()
            pause = min(pause * 2, WRITE_RETRY_MAX)
            try:
                if not await self._holds(entry):
                    await self.backend.append(x.run_id, x.position, entry)
            except PositionTaken as exc:
                raise Fenced(str(exc)) from exc
            except BackendUnavailable as exc:
                failed = exc
            else:
                break
        logger.warning(
            "run %s: its log is written again, after %d failed attempt(s)", x.run_id, failures
        )

    async def _holds(self, entry: bytes) -> bool:
        """Tell whether the run's next position already holds ``entry`` (by its records)."""
        x = self.x
        held = await self.backend.read_log(x.run_id, x.position)
        return bool(held) and decode_entry(x.run_id, x.position, held[0]) == decode_entry(
            x.run_id, x.position, entry
        )

    def _refuse_endless_timers(self) -> bool:
        """Fail the run if the workflow armed an asyncio timer with no storable due time.

        Such a timer (``asyncio.sleep(nan)``, ``asyncio.timeout(math.inf)``) is dropped
        unwritten. ``c.sleep`` and ``receive`` check their durations when called; asyncio's
        own timers reach the run only as due times, here. NaN or infinity would be stored
        as null, and a due time past :data:`MAX_SECONDS` does not fit the stores' time keys.
        """
        x = self.x
        if not x.sleeps_pending:
            return False
        limit = _clock.now() + MAX_SECONDS
        bad = [
            r
            for r in x.pending
            if r["k"] == "sleep" and not (math.isfinite(r["until"]) and r["until"] <= limit)
        ]
        if not bad:
            return False
        x.pending = [r for r in x.pending if all(r is not b for b in bad)]
        if x.failure is None:
            x.failure = InvalidArgument(
                f"run {x.run_id!r}: an asyncio timer of the workflow (asyncio.sleep, timeout, "
                f"wait_for, wait) is due at {bad[0]['until']!r}, which is not a finite time "
                "within 1000 years: pass a finite delay, or None for no timeout"
            )
        return True

    async def _ack_recorded(self) -> None:
        """Acknowledge, with the next write, inbox events the log already holds.

        A worker that died between recording an event and acknowledging it leaves
        the event in the inbox; a run that then ends during replay never reads its
        inbox live, so it is done here.
        """
        x = self.x
        for event in await self.backend.read_inbox(x.run_id):
            if event.event_id in x.seen_ids and event.event_id not in x.to_ack:
                x.to_ack.append(event.event_id)
