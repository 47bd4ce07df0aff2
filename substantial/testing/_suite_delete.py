"""The conformance suite, part four: ``delete``, the optional retention primitive.

A backend that declares ``capabilities.delete`` must remove everything of a
run and nothing of any other, idempotently, and stay consistent when
deletes race each other, appends, leases and readers. One that does not
must refuse with :class:`Unsupported`, so a caller learns it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from substantial.backends.base import Backend, NewEvent, RunInfo
from substantial.errors import InvalidArgument, PositionTaken, Unsupported
from substantial.testing._support import Opener, info

__all__ = ["DeleteTests"]


async def _full_run(backend: Backend, run_id: str, entries: int = 3) -> RunInfo:
    """Store a run with every kind of data: log, event, due entry, lease, metadata."""
    for position in range(entries):
        await backend.append(run_id, position, b"%s-%d" % (run_id.encode(), position))
    await backend.set_due(run_id, time.time() - 1, event=NewEvent("e1", b"{}"))
    await backend.lease(run_id, "holder", 60)
    done = info(run_id, status="completed")
    await backend.put_run(done)
    return done


async def _deletes(backend: Backend) -> bool:
    """Tell whether the backend deletes; one that does not must say so when asked to."""
    if backend.capabilities.delete:
        return True
    with pytest.raises(Unsupported, match="cannot delete runs"):
        await backend.delete("d")
    return False


class DeleteTests:
    """``delete`` removes a run's log, inbox, due entry, lease and metadata, and only those."""

    async def test_delete_removes_everything_of_the_run_and_nothing_else(
        self, backend: Backend
    ) -> None:
        """After a delete nothing of the run reads; other runs are as they were; ids come back."""
        if not await _deletes(backend):
            return
        await _full_run(backend, "d", 5)
        keep = await _full_run(backend, "keep")
        assert await backend.delete("d") is True
        assert await backend.read_log("d") == []
        assert await backend.read_log("d", 2) == []
        assert await backend.read_inbox("d") == []
        assert await backend.lease("d") is None
        assert await backend.get_run("d") is None
        assert [r.run_id for r in await backend.list_runs()] == ["keep"]
        assert [r for r, _ in await backend.due(time.time() + 10)] == ["keep"]
        assert await backend.read_log("keep") == [b"keep-0", b"keep-1", b"keep-2"]
        assert [e.event_id for e in await backend.read_inbox("keep")] == ["e1"]
        lease = await backend.lease("keep")
        assert lease is not None and lease.owner == "holder"
        assert await backend.get_run("keep") == keep
        # Idempotent, and the id may be used again from position 0.
        assert await backend.delete("d") is False
        assert await backend.delete("never-was") is False
        await backend.append("d", 0, b"again")
        assert await backend.read_log("d") == [b"again"]
        with pytest.raises(InvalidArgument, match="invalid run id"):
            await backend.delete("../escape")

    async def test_a_delete_of_what_is_left_of_a_run_finishes_it(self, backend: Backend) -> None:
        """Any part of a run alone (an event, a lease, metadata, a due entry) is deleted too."""
        if not await _deletes(backend):
            return
        await backend.set_due("ev", time.time() + 60, event=NewEvent("x", b"1"))
        await backend.lease("ls", "someone", 60)
        await backend.put_run(info("mt", status="failed"))
        await backend.schedule("du", time.time() + 30)
        for run_id in ("ev", "ls", "mt", "du"):
            assert await backend.delete(run_id) is True, run_id
        assert await backend.read_inbox("ev") == []
        assert await backend.lease("ls") is None
        assert await backend.list_runs() == []
        assert await backend.next_due_at() is None

    async def test_concurrent_deletes_and_readers_see_the_run_whole_or_gone(
        self, open_client: Opener
    ) -> None:
        """Many clients delete one run at once while others read it: no error, no stray part."""
        clients = [await open_client() for _ in range(4)]
        if not await _deletes(clients[0]):
            return
        full = await _full_run(clients[0], "cd", 6)
        log = await clients[0].read_log("cd")
        done = asyncio.Event()

        async def reader(backend: Backend) -> int:
            reads = 0
            while not done.is_set() or reads == 0:
                seen = await backend.read_log("cd")
                assert seen == log[: len(seen)], "a deleted run read as another log"
                assert await backend.get_run("cd") in (full, None)
                reads += 1
                await asyncio.sleep(0)  # an in-process store never yields on its own
            return reads

        readers = [asyncio.ensure_future(reader(clients[0]))]
        found = await asyncio.gather(*(clients[i % 4].delete("cd") for i in range(6)))
        done.set()
        await asyncio.gather(*readers)
        assert any(found)
        for backend in clients:
            assert await backend.read_log("cd") == []
            assert await backend.get_run("cd") is None
            assert await backend.lease("cd") is None
            assert await backend.read_inbox("cd") == []

    async def test_a_delete_racing_appends_and_leases_leaves_a_consistent_store(
        self, open_client: Opener
    ) -> None:
        """Appenders and lease takers racing a delete fail cleanly or land; a second delete cleans.

        An append meeting a delete either lands before it (and goes with the
        run), or after it on a fresh log, or is refused (position taken, or a
        gap where the log went from under it); a lease take alike. Whatever
        the interleaving, the log reads as a run's log from position 0, and
        one more delete leaves nothing.
        """
        clients = [await open_client() for _ in range(3)]
        if not await _deletes(clients[0]):
            return
        await _full_run(clients[0], "ra", 4)

        async def appender(backend: Backend, n: int) -> None:
            for position in range(3, 6):
                with contextlib.suppress(PositionTaken, InvalidArgument):
                    await backend.append("ra", position, b"w%d" % n)

        async def leaser(backend: Backend, n: int) -> None:
            for _ in range(2):
                await backend.lease("ra", f"w{n}", 30)
                await backend.lease("ra", f"w{n}", 0)

        work: list[Coroutine[Any, Any, object]] = [appender(clients[i % 3], i) for i in range(3)]
        work += [leaser(clients[i % 3], i) for i in range(2)]
        work += [clients[i].delete("ra") for i in range(3)]
        await asyncio.gather(*work)
        log = await clients[0].read_log("ra")
        assert not log or log[0] == b"ra-0", log  # never a log that starts mid-way
        await clients[1].delete("ra")
        for backend in clients:
            assert await backend.read_log("ra") == []
            assert await backend.lease("ra") is None
            assert await backend.get_run("ra") is None
