"""The conformance suite, part two: the inbox and the due index.

``read_inbox``, ``set_due`` and ``due``.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from substantial.backends.base import Backend, NewEvent
from substantial.errors import InvalidArgument, Unsupported
from substantial.testing._support import Opener

__all__ = ["DueTests", "InboxTests"]


async def _post(backend: Backend, run_id: str, event_id: str, data: bytes) -> bool:
    return await backend.set_due(run_id, time.time(), event=NewEvent(event_id, data))


class InboxTests:
    """Events: stored once per id, read in arrival order, removed once acknowledged."""

    async def test_the_inbox_is_idempotent_and_ordered(self, backend: Backend) -> None:
        """An event id is stored once; the inbox reads in arrival order."""
        assert await backend.read_inbox("r") == []
        assert await _post(backend, "r", "e1", b'{"n":1}') is True
        assert await _post(backend, "r", "e2", b'{"n":2}') is True
        assert await _post(backend, "r", "e1", b'{"n":"dup"}') is False
        assert await _post(backend, "r", "e3", b'{"n":3}') is True
        events = await backend.read_inbox("r")
        assert [e.event_id for e in events] == ["e1", "e2", "e3"]
        assert events[0].data == b'{"n":1}'
        assert all(abs(e.posted_at - time.time()) < 300 for e in events)
        assert await backend.read_inbox("other") == []
        remaining = await backend.read_inbox("r", ack=["e2"])
        assert [e.event_id for e in remaining] == ["e1", "e3"]
        assert [e.event_id for e in await backend.read_inbox("r")] == ["e1", "e3"]

    async def test_the_inbox_keeps_the_send_order_of_one_sender(self, backend: Backend) -> None:
        """Events posted one after the other read back in that order, whatever their ids."""
        for i in range(50):
            await _post(backend, "order", f"ev{i:03d}-{os.urandom(2).hex()}", b"%d" % i)
        events = await backend.read_inbox("order")
        assert [int(e.data) for e in events] == list(range(50))

    async def test_concurrent_posts_of_one_id_store_it_once(self, open_client: Opener) -> None:
        """Of many concurrent posts of one event id, exactly one is stored."""
        clients = [await open_client() for _ in range(4)]
        results = await asyncio.gather(
            *(_post(clients[i % 4], "r", "same", b"%d" % i) for i in range(32))
        )
        assert sum(results) == 1
        events = await clients[0].read_inbox("r")
        assert len(events) == 1 and events[0].data == b"%d" % results.index(True)

    async def test_concurrent_posts_of_distinct_ids_are_all_kept(self, open_client: Opener) -> None:
        """Concurrent posts of different ids are all stored."""
        clients = [await open_client() for _ in range(4)]
        await asyncio.gather(*(_post(clients[i % 4], "r", f"e{i}", b"1") for i in range(32)))
        assert len(await clients[0].read_inbox("r")) == 32

    async def test_an_invalid_event_id_is_refused(self, backend: Backend) -> None:
        """Posting an event whose id is not valid raises InvalidArgument."""
        with pytest.raises(InvalidArgument, match="invalid event id"):
            await _post(backend, "r", "a/b", b"1")
        assert await backend.read_inbox("r") == []

    async def test_ack_ignores_ids_not_in_the_inbox_and_malformed_ones(
        self, backend: Backend
    ) -> None:
        """Acknowledging is cleanup: unknown and malformed ids are ignored, never an error."""
        await _post(backend, "r", "e1", b"1")
        await _post(backend, "r", "e2", b"2")
        odd: list[object] = ["e1", "e1", "missing", "../e2", "", "a b", 5, None]
        left = await backend.read_inbox("r", ack=odd)  # type: ignore[arg-type]
        assert [e.event_id for e in left] == ["e2"]
        assert [e.event_id for e in await backend.read_inbox("r", ack=[])] == ["e2"]

    async def test_an_acknowledged_event_id_can_be_posted_again(self, backend: Backend) -> None:
        """The inbox forgets an acknowledged id: deduplication after that is the log's job."""
        assert await _post(backend, "r", "once", b"1") is True
        await backend.read_inbox("r", ack=["once"])
        assert await _post(backend, "r", "once", b"2") is True
        (event,) = await backend.read_inbox("r")
        assert event.data == b"2"


class DueTests:
    """The due index: one time per run, read in time order without scanning every run."""

    async def test_the_due_index_orders_by_time(self, backend: Backend) -> None:
        """``due`` returns runs due by ``now``, earliest first, up to ``limit``, and next_at."""
        now = time.time()
        due = await backend.due(now)
        assert due == [] and due.next_at is None
        await backend.set_due("late", now - 1)
        await backend.set_due("early", now - 30)
        await backend.set_due("future", now + 3600)
        await backend.set_due("mid", now - 10)
        due = await backend.due(now)
        assert [r for r, _ in due] == ["early", "mid", "late"]
        assert due[0][1] == pytest.approx(now - 30, abs=0.01)
        assert due.next_at == pytest.approx(now + 3600, abs=0.01)
        first_two = await backend.due(now, limit=2)
        assert [r for r, _ in first_two] == ["early", "mid"]
        assert first_two.next_at == pytest.approx(now - 1, abs=0.01)  # due, beyond the limit
        assert (await backend.due(now, limit=0)).next_at == pytest.approx(now - 30, abs=0.01)

    async def test_set_due_replaces_and_none_removes(self, backend: Backend) -> None:
        """A run has one due time: setting it again replaces it, None removes it."""
        now = time.time()
        await backend.set_due("a", now - 5)
        await backend.set_due("b", now - 4)
        await backend.set_due("a", now + 100)
        assert [r for r, _ in await backend.due(now)] == ["b"]
        await backend.set_due("a", now - 10)
        assert [r for r, _ in await backend.due(now)] == ["a", "b"]
        await backend.set_due("a", None)
        await backend.set_due("never-scheduled", None)
        assert [r for r, _ in await backend.due(now)] == ["b"]
        await backend.set_due("b", None)
        due = await backend.due(now + 1000)
        assert due == [] and due.next_at is None

    async def test_an_event_and_its_due_time_are_set_together(self, backend: Backend) -> None:
        """``set_due`` with an event stores it and sets the time, even for a duplicate id."""
        now = time.time()
        assert await backend.set_due("r", now + 60, event=NewEvent("e", b"1")) is True
        assert [e.event_id for e in await backend.read_inbox("r")] == ["e"]
        assert (await backend.due(now)).next_at == pytest.approx(now + 60, abs=0.01)
        assert await backend.set_due("r", now - 1, event=NewEvent("e", b"2")) is False
        assert [r for r, _ in await backend.due(now)] == ["r"]
        (event,) = await backend.read_inbox("r")
        assert event.data == b"1"
        with pytest.raises(InvalidArgument, match="give a time"):
            await backend.set_due("r", None, event=NewEvent("e2", b"3"))

    async def test_unschedule_idle_takes_a_run_out_only_if_no_event_waits(
        self, backend: Backend
    ) -> None:
        """``unschedule_idle``: out of the index with an empty inbox; untouched with an event."""
        if not backend.capabilities.unschedule_idle:
            with pytest.raises(Unsupported, match="unschedule_idle"):
                await backend.unschedule_idle("r")
            return
        now = time.time()
        await backend.set_due("r", now - 1)
        assert await backend.unschedule_idle("r") is True
        assert await backend.due(now + 1000) == []
        assert await backend.unschedule_idle("r") is True  # not in the index: still not due
        assert await backend.unschedule_idle("never-scheduled") is True
        await backend.set_due("r", now - 2, event=NewEvent("e", b"1"))
        assert await backend.unschedule_idle("r") is False
        ((run_id, at),) = await backend.due(now)
        assert run_id == "r" and at == pytest.approx(now - 2, abs=0.01)
        await backend.read_inbox("r", ack=["e"])
        assert await backend.unschedule_idle("r") is True
        assert await backend.due(now + 1000) == []

    async def test_unschedule_idle_racing_posts_never_leaves_an_event_unscheduled(
        self, open_client: Opener
    ) -> None:
        """Whatever the order, a run with an event in its inbox ends up in the due index."""
        worker, sender = await open_client(), await open_client()
        if not worker.capabilities.unschedule_idle:
            return
        for i in range(40):
            run_id = f"race{i}"
            await worker.set_due(run_id, time.time() - 1)
            # Each side's call may land first; both stores are one and the same.
            await asyncio.gather(
                worker.unschedule_idle(run_id), _post(sender, run_id, f"e{i}", b"1")
            )
            assert await worker.read_inbox(run_id)
            due = {r for r, _ in await worker.due(time.time() + 1, 1000)}
            assert run_id in due, f"round {i}: an event waits in the inbox of an unscheduled run"

    async def test_the_due_index_at_scale_answers_only_due_runs(self, backend: Backend) -> None:
        """Hundreds of runs due later do not show up now."""
        now = time.time()
        await asyncio.gather(*(backend.set_due(f"w{i}", now + 3600 + i) for i in range(300)))
        await backend.set_due("ready", now - 1)
        due = await backend.due(now)
        assert [r for r, _ in due] == ["ready"]
        assert due.next_at == pytest.approx(now + 3600, abs=0.01)

    async def test_set_due_refuses_a_time_that_is_not_a_finite_number(
        self, backend: Backend
    ) -> None:
        """NaN, infinities and non-numbers raise InvalidArgument and change nothing."""
        for bad in (float("nan"), float("inf"), -float("inf"), "soon"):
            with pytest.raises(InvalidArgument, match="finite number"):
                await backend.set_due("t", bad)  # type: ignore[arg-type]
        assert (await backend.due(time.time() + 1e9)).next_at is None

    async def test_a_time_far_in_the_future_stays_not_due(
        self, backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A due time in year 9999 (past some stores' time keys) is never due now.

        It is read without complaint, and stays later than any time a worker polls at.
        """
        now = time.time()
        await backend.set_due("far", 253_402_300_799.0)
        await backend.set_due("soon", now - 1)
        for _ in range(2):  # a store that found it unreadable would have "fixed" it by now
            due = await backend.due(now)
            assert [r for r, _ in due] == ["soon"]
        assert due.next_at is not None and due.next_at >= 32_503_680_000.0  # year 3000
        assert not [r for r in caplog.records if "far" in r.getMessage()]

    async def test_due_with_no_room_returns_nothing(self, backend: Backend) -> None:
        """A limit of zero or less returns no run."""
        await backend.set_due("d", time.time() - 1)
        assert await backend.due(time.time(), limit=0) == []
        assert await backend.due(time.time(), limit=-1) == []
        assert [r for r, _ in await backend.due(time.time(), limit=1)] == ["d"]
