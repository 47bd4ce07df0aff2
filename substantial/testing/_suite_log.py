"""The conformance suite, part one: the log (``append``, ``read_log``) and bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from substantial.backends.base import Backend, NewEvent
from substantial.errors import InvalidArgument, PositionTaken
from substantial.testing._children import appender, big_entry, race, race_entry
from substantial.testing._support import CHILD_TIMEOUT, Opener, Store, info, url_of

__all__ = ["LogTests"]


class LogTests:
    """The log's fencing and reading, and the answers every backend gives to bad input."""

    #: Processes released at one instant to append at one position (forked, not started).
    race_processes = 32

    async def test_append_and_read(self, backend: Backend) -> None:
        """Entries come back in position order, from any start."""
        assert await backend.read_log("r1") == []
        for i in range(5):
            await backend.append("r1", i, b"entry %d" % i)
        assert await backend.read_log("r1") == [b"entry %d" % i for i in range(5)]
        assert await backend.read_log("r1", 3) == [b"entry 3", b"entry 4"]
        assert await backend.read_log("r1", 5) == []
        assert await backend.read_log("other") == []

    async def test_entries_are_opaque_bytes(self, backend: Backend) -> None:
        """Any bytes round-trip exactly: empty, NUL, invalid UTF-8, large."""
        values = [b"", b"\x00{not json", b"\xff\xfe\x80", "é".encode() * 300_000]
        for i, value in enumerate(values):
            await backend.append("bytes", i, value)
        assert await backend.read_log("bytes") == values

    async def test_append_at_a_taken_position_raises_and_keeps_the_first(
        self, backend: Backend
    ) -> None:
        """The fence: a taken position raises PositionTaken and the stored entry stays."""
        await backend.append("r", 0, b"first")
        with pytest.raises(PositionTaken) as err:
            await backend.append("r", 0, b"second")
        assert err.value.run_id == "r" and err.value.position == 0
        assert await backend.read_log("r") == [b"first"]

    async def test_32_concurrent_appenders_exactly_one_wins(self, open_client: Opener) -> None:
        """Of many concurrent appends at one position (4 clients), exactly one is stored."""
        clients = [await open_client() for _ in range(4)]
        await clients[0].append("race", 0, b"base")

        async def attempt(i: int) -> bool:
            try:
                await clients[i % len(clients)].append("race", 1, b"w%d" % i)
                return True
            except PositionTaken:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(32)))
        assert sum(results) == 1
        assert await clients[1].read_log("race") == [b"base", b"w%d" % results.index(True)]

    async def test_concurrent_processes_exactly_one_wins(
        self, store: Store, backend: Backend
    ) -> None:
        """Of ``race_processes`` processes appending at one position at once, exactly one wins."""
        url = url_of(store)
        await backend.append("prace", 0, b"base")
        n = self.race_processes
        preload = [type(backend).__module__]
        outputs = await asyncio.to_thread(race, url, "prace", 1, n, CHILD_TIMEOUT, preload)
        assert outputs.count("won") == 1 and outputs.count("lost") == n - 1, outputs
        winner = f"p{outputs.index('won')}"
        assert await backend.read_log("prace") == [b"base", race_entry(winner)]

    async def test_kill_9_mid_append_never_leaves_a_half_entry(
        self, store: Store, backend: Backend
    ) -> None:
        """A writer killed with SIGKILL leaves whole entries only, and no gap."""
        url = url_of(store)
        preload = [type(backend).__module__]
        for round_ in range(3):
            before = len(await backend.read_log("k9"))
            proc = await asyncio.to_thread(appender, url, "k9", CHILD_TIMEOUT, preload)
            # Kill it once it has written at least once this round: mid-write, likely.
            for _ in range(1000):
                if await backend.read_log("k9", before):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01 * round_)
            if not proc.is_alive():
                pytest.fail(f"the writer died on its own (exit code {proc.exitcode})")
            proc.kill()
            await asyncio.to_thread(proc.join)  # reap it
            log = await backend.read_log("k9")
            assert len(log) > before
            assert log == [big_entry(i) for i in range(len(log))]

    async def test_an_append_that_would_leave_a_gap_is_refused(self, open_client: Opener) -> None:
        """Appending past the first free position raises InvalidArgument ("gap")."""
        backend = await open_client()
        with pytest.raises(InvalidArgument, match="gap"):
            await backend.append("g", 1, b"1")
        await backend.append("g", 0, b"0")
        with pytest.raises(InvalidArgument, match="position 1 is empty"):
            await backend.append("g", 2, b"2")
        # A client that never read the log judges by what is stored, not by what it saw.
        fresh = await open_client()
        await fresh.append("g", 1, b"1")
        with pytest.raises(InvalidArgument, match="gap"):
            await fresh.append("g", 3, b"3")
        with pytest.raises(PositionTaken):
            await backend.append("g", 1, b"again")
        assert await backend.read_log("g") == [b"0", b"1"]

    async def test_positions_must_be_whole_numbers_from_zero(self, backend: Backend) -> None:
        """A negative or non-integer position or start raises InvalidArgument."""
        for bad in (-1, 1.5, "1", True):
            with pytest.raises(InvalidArgument, match="whole number"):
                await backend.append("n", bad, b"0")  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="whole number"):
                await backend.read_log("n", bad)  # type: ignore[arg-type]
        assert await backend.read_log("n") == []

    async def test_every_operation_refuses_an_invalid_run_id(self, backend: Backend) -> None:
        """Each method given a run id that is not valid raises InvalidArgument."""
        bad = "../escape"
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: backend.append(bad, 0, b"0"),
            lambda: backend.read_log(bad),
            lambda: backend.read_inbox(bad),
            lambda: backend.read_inbox(bad, ack=["e"]),
            lambda: backend.set_due(bad, time.time()),
            lambda: backend.set_due(bad, None),
            lambda: backend.set_due(bad, time.time(), event=NewEvent("e", b"1")),
            lambda: backend.lease(bad),
            lambda: backend.lease(bad, "me", 30),
            lambda: backend.lease(bad, "me", 0),
            lambda: backend.put_run(info(bad)),
            lambda: backend.list_runs(ids=[bad]),
        ]
        for call in calls:
            with pytest.raises(InvalidArgument, match="invalid run id"):
                await call()
        for bad_id in ["", "a/b", ".hidden", "x" * 201, "spa ce"]:
            with pytest.raises(InvalidArgument, match="invalid run id"):
                await backend.append(bad_id, 0, b"0")

    async def test_unknown_runs_read_as_empty_and_their_cleanup_is_a_no_op(
        self, backend: Backend
    ) -> None:
        """Reading a run never written gives nothing; cleaning it up changes nothing."""
        assert await backend.read_log("ghost") == []
        assert await backend.read_log("ghost", 7) == []
        assert await backend.read_inbox("ghost") == []
        assert await backend.read_inbox("ghost", ack=["e1"]) == []
        assert await backend.list_runs(ids=["ghost"]) == []
        assert await backend.lease("ghost") is None
        assert await backend.lease("ghost", "me", 0) is None
        await backend.set_due("ghost", None)
        assert await backend.list_runs() == []
        due = await backend.due(time.time() + 3600)
        assert due == [] and due.next_at is None
