"""The Backend contract as a test suite: a backend, ours or yours, tests itself with it.

Subclass :class:`BackendContract` in a pytest module and define one fixture,
``store``, returning a :class:`Store`::

    import pytest
    from substantial.testing.contract import BackendContract, Store

    class TestToyBackend(BackendContract):
        @pytest.fixture
        def store(self, tmp_path):
            return Store.from_url(f"toy://{tmp_path}")

Every test then runs on that backend: the log's fencing (many appenders at
one position, in one process and across processes: exactly one wins), the
inbox, the due index, leases, metadata, wake-ups, and the answers to bad
input that every backend gives alike. Tests that need other processes to
open the same store run only when ``Store.url`` is set. The suite needs
``pytest`` and ``pytest-asyncio`` (``pip install 'substantial[testing]'``).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from substantial.backends import from_url
from substantial.backends.base import Backend, RunInfo
from substantial.errors import InvalidArgument, PositionTaken
from substantial.testing._children import big_entry, race_entry

__all__ = ["BackendContract", "Store"]

#: How long a child process of a race or crash test may take (a loaded machine is slow).
_CHILD_TIMEOUT = 90.0


@dataclass(frozen=True)
class Store:
    """The backend under test, as the suite reaches it.

    ``open`` returns a new client of the one store under test (a coroutine
    function or a plain one); the suite closes every client it opened.
    ``url``, if set, opens the same store from another process with
    :func:`substantial.backends.from_url`: the cross-process race, crash
    and lifecycle tests run only then.
    """

    open: Callable[[], Backend | Awaitable[Backend]]
    url: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Store:
        """Reach the store through its URL, from this process and from others."""
        return cls(lambda: from_url(url), url)


async def _child(*args: str) -> asyncio.subprocess.Process:
    """Start ``python -m substantial.testing._children ARGS``, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "substantial.testing._children",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def _info(run_id: str, workflow: str = "wf", status: str = "active") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, status, now, now)  # type: ignore[arg-type]


Opener = Callable[[], Awaitable[Backend]]


@pytest.mark.asyncio
class BackendContract:
    """The conformance suite; subclass it and define the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Store:
        """Return the store under test (override this fixture)."""
        pytest.fail(
            f"{type(self).__name__} must define a `store` fixture returning "
            "substantial.testing.contract.Store"
        )

    @pytest_asyncio.fixture
    async def open_client(self, store: Store) -> AsyncIterator[Opener]:
        """Yield a function that opens one more client of the store; close them all after."""
        opened: dict[int, Backend] = {}

        async def open_() -> Backend:
            made = store.open()
            backend = await made if inspect.isawaitable(made) else made
            assert isinstance(backend, Backend), f"Store.open returned {backend!r}"
            opened[id(backend)] = backend
            return backend

        yield open_
        for backend in opened.values():
            await backend.close()

    @pytest_asyncio.fixture
    async def backend(self, open_client: Opener) -> Backend:
        """Return one client of the store."""
        return await open_client()

    @staticmethod
    def _url(store: Store) -> str:
        if store.url is None:
            pytest.skip("Store.url is not set: other processes cannot open this store")
        return store.url

    # -- the log ------------------------------------------------------------

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

    async def test_32_concurrent_processes_exactly_one_wins(
        self, store: Store, backend: Backend
    ) -> None:
        """Of 32 processes appending at one position at one instant, exactly one wins."""
        url = self._url(store)
        await backend.append("prace", 0, b"base")
        start_at = str(time.time() + 2.5)
        procs = [
            await _child("append-race", url, "prace", "1", f"p{i}", start_at) for i in range(32)
        ]
        outputs = []
        for p in procs:
            out, err = await asyncio.wait_for(p.communicate(), _CHILD_TIMEOUT)
            assert p.returncode == 0, err.decode()
            outputs.append(out.decode().strip())
        assert outputs.count("won") == 1 and outputs.count("lost") == 31, outputs
        winner = f"p{outputs.index('won')}"
        assert await backend.read_log("prace") == [b"base", race_entry(winner)]

    async def test_kill_9_mid_append_never_leaves_a_half_entry(
        self, store: Store, backend: Backend
    ) -> None:
        """A writer killed with SIGKILL leaves whole entries only, and no gap."""
        url = self._url(store)
        for round_ in range(3):
            before = len(await backend.read_log("k9"))
            proc = await _child("append-forever", url, "k9")
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), _CHILD_TIMEOUT)
            assert line.strip() == b"ready"
            # Kill it once it has written at least once this round: mid-write, likely.
            for _ in range(1000):
                if await backend.read_log("k9", before):
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01 * round_)
            if proc.returncode is not None:
                _, err = await proc.communicate()
                pytest.fail(f"the writer died on its own: {err.decode()}")
            proc.kill()
            await proc.communicate()  # reap it and close its pipes
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
            lambda: backend.post_event(bad, "e", b"1"),
            lambda: backend.read_inbox(bad),
            lambda: backend.ack_events(bad, ["e"]),
            lambda: backend.schedule(bad, time.time()),
            lambda: backend.unschedule(bad),
            lambda: backend.acquire_lease(bad, "me", 30),
            lambda: backend.release_lease(bad, "me"),
            lambda: backend.get_lease(bad),
            lambda: backend.put_run(_info(bad)),
            lambda: backend.get_run(bad),
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
        assert await backend.get_run("ghost") is None
        assert await backend.get_lease("ghost") is None
        await backend.ack_events("ghost", ["e1"])
        await backend.unschedule("ghost")
        await backend.release_lease("ghost", "me")
        assert await backend.list_runs() == []
        assert await backend.due(time.time() + 3600) == []
        assert await backend.next_due_at() is None

    # -- the inbox ----------------------------------------------------------

    async def test_the_inbox_is_idempotent_and_ordered(self, backend: Backend) -> None:
        """An event id is stored once; the inbox reads in arrival order."""
        assert await backend.read_inbox("r") == []
        assert await backend.post_event("r", "e1", b'{"n":1}') is True
        assert await backend.post_event("r", "e2", b'{"n":2}') is True
        assert await backend.post_event("r", "e1", b'{"n":"dup"}') is False
        assert await backend.post_event("r", "e3", b'{"n":3}') is True
        events = await backend.read_inbox("r")
        assert [e.event_id for e in events] == ["e1", "e2", "e3"]
        assert events[0].data == b'{"n":1}'
        assert all(abs(e.posted_at - time.time()) < 300 for e in events)
        assert await backend.read_inbox("other") == []
        await backend.ack_events("r", ["e2"])
        assert [e.event_id for e in await backend.read_inbox("r")] == ["e1", "e3"]

    async def test_the_inbox_keeps_the_send_order_of_one_sender(self, backend: Backend) -> None:
        """Events posted one after the other read back in that order, whatever their ids."""
        for i in range(50):
            await backend.post_event("order", f"ev{i:03d}-{os.urandom(2).hex()}", b"%d" % i)
        events = await backend.read_inbox("order")
        assert [int(e.data) for e in events] == list(range(50))

    async def test_concurrent_posts_of_one_id_store_it_once(self, open_client: Opener) -> None:
        """Of many concurrent posts of one event id, exactly one is stored."""
        clients = [await open_client() for _ in range(4)]
        results = await asyncio.gather(
            *(clients[i % 4].post_event("r", "same", b"%d" % i) for i in range(32))
        )
        assert sum(results) == 1
        events = await clients[0].read_inbox("r")
        assert len(events) == 1 and events[0].data == b"%d" % results.index(True)

    async def test_concurrent_posts_of_distinct_ids_are_all_kept(self, open_client: Opener) -> None:
        """Concurrent posts of different ids are all stored."""
        clients = [await open_client() for _ in range(4)]
        await asyncio.gather(*(clients[i % 4].post_event("r", f"e{i}", b"1") for i in range(32)))
        assert len(await clients[0].read_inbox("r")) == 32

    async def test_an_invalid_event_id_is_refused(self, backend: Backend) -> None:
        """Posting an event whose id is not valid raises InvalidArgument."""
        with pytest.raises(InvalidArgument, match="invalid event id"):
            await backend.post_event("r", "a/b", b"1")

    async def test_ack_ignores_ids_not_in_the_inbox_and_malformed_ones(
        self, backend: Backend
    ) -> None:
        """Acknowledging is cleanup: unknown and malformed ids are ignored, never an error."""
        await backend.post_event("r", "e1", b"1")
        await backend.post_event("r", "e2", b"2")
        odd: list[object] = ["e1", "e1", "missing", "../e2", "", "a b", 5, None]
        await backend.ack_events("r", odd)  # type: ignore[arg-type]
        assert [e.event_id for e in await backend.read_inbox("r")] == ["e2"]
        await backend.ack_events("r", [])
        assert [e.event_id for e in await backend.read_inbox("r")] == ["e2"]

    async def test_an_acknowledged_event_id_can_be_posted_again(self, backend: Backend) -> None:
        """The inbox forgets an acknowledged id: deduplication after that is the log's job."""
        assert await backend.post_event("r", "once", b"1") is True
        await backend.ack_events("r", ["once"])
        assert await backend.post_event("r", "once", b"2") is True
        (event,) = await backend.read_inbox("r")
        assert event.data == b"2"

    # -- the due index ------------------------------------------------------

    async def test_the_due_index_orders_by_time(self, backend: Backend) -> None:
        """``due`` returns runs due by ``now``, earliest first, up to ``limit``."""
        now = time.time()
        assert await backend.due(now) == []
        assert await backend.next_due_at() is None
        await backend.schedule("late", now - 1)
        await backend.schedule("early", now - 30)
        await backend.schedule("future", now + 3600)
        await backend.schedule("mid", now - 10)
        due = await backend.due(now)
        assert [r for r, _ in due] == ["early", "mid", "late"]
        assert due[0][1] == pytest.approx(now - 30, abs=0.01)
        assert [r for r, _ in await backend.due(now, limit=2)] == ["early", "mid"]
        assert await backend.next_due_at() == pytest.approx(now - 30, abs=0.01)

    async def test_reschedule_replaces_and_unschedule_removes(self, backend: Backend) -> None:
        """A run has one due time: scheduling again replaces it, unscheduling removes it."""
        now = time.time()
        await backend.schedule("a", now - 5)
        await backend.schedule("b", now - 4)
        await backend.schedule("a", now + 100)
        assert [r for r, _ in await backend.due(now)] == ["b"]
        await backend.schedule("a", now - 10)
        assert [r for r, _ in await backend.due(now)] == ["a", "b"]
        await backend.unschedule("a")
        await backend.unschedule("never-scheduled")
        assert [r for r, _ in await backend.due(now)] == ["b"]
        await backend.unschedule("b")
        assert await backend.due(now + 1000) == []
        assert await backend.next_due_at() is None

    async def test_the_due_index_at_scale_answers_only_due_runs(self, backend: Backend) -> None:
        """Hundreds of runs due later do not show up now."""
        now = time.time()
        await asyncio.gather(*(backend.schedule(f"w{i}", now + 3600 + i) for i in range(300)))
        await backend.schedule("ready", now - 1)
        assert [r for r, _ in await backend.due(now)] == ["ready"]

    async def test_schedule_refuses_a_time_that_is_not_a_finite_number(
        self, backend: Backend
    ) -> None:
        """NaN, infinities and non-numbers raise InvalidArgument and change nothing."""
        for bad in (float("nan"), float("inf"), -float("inf"), "soon", None):
            with pytest.raises(InvalidArgument, match="finite number"):
                await backend.schedule("t", bad)  # type: ignore[arg-type]
        assert await backend.next_due_at() is None

    async def test_due_with_no_room_returns_nothing(self, backend: Backend) -> None:
        """A limit of zero or less returns no run."""
        await backend.schedule("d", time.time() - 1)
        assert await backend.due(time.time(), limit=0) == []
        assert await backend.due(time.time(), limit=-1) == []
        assert [r for r, _ in await backend.due(time.time(), limit=1)] == ["d"]

    # -- leases -------------------------------------------------------------

    async def test_a_lease_is_taken_renewed_and_released(self, backend: Backend) -> None:
        """Only its holder renews or releases a live lease."""
        assert await backend.get_lease("r") is None
        assert await backend.acquire_lease("r", "alice", 30)
        assert not await backend.acquire_lease("r", "bob", 30)
        lease = await backend.get_lease("r")
        assert lease is not None and lease.owner == "alice"
        assert lease.expires_at == pytest.approx(time.time() + 30, abs=2)
        assert await backend.acquire_lease("r", "alice", 60)  # renewal
        lease = await backend.get_lease("r")
        assert lease is not None and lease.expires_at == pytest.approx(time.time() + 60, abs=2)
        await backend.release_lease("r", "bob")  # not bob's: no effect
        assert not await backend.acquire_lease("r", "bob", 30)
        await backend.release_lease("r", "alice")
        assert await backend.acquire_lease("r", "bob", 30)

    async def test_a_lease_expires(self, backend: Backend) -> None:
        """After its ttl, a lease is anyone's."""
        # Long enough that a slow store's round trip cannot outlast it, short enough to wait.
        assert await backend.acquire_lease("r", "alice", 1.0)
        assert not await backend.acquire_lease("r", "bob", 10)
        await asyncio.sleep(1.2)
        assert await backend.acquire_lease("r", "bob", 10)
        assert not await backend.acquire_lease("r", "alice", 10)

    async def test_a_lease_is_taken_over_only_from_the_named_owner(self, backend: Backend) -> None:
        """``steal_from`` takes a live lease from that owner only."""
        assert await backend.acquire_lease("r", "alice", 30)
        assert not await backend.acquire_lease("r", "bob", 30, steal_from="carol")
        assert await backend.acquire_lease("r", "bob", 30, steal_from="alice")
        lease = await backend.get_lease("r")
        assert lease is not None and lease.owner == "bob"

    async def test_concurrent_lease_takers_exactly_one_wins(self, open_client: Opener) -> None:
        """Of many concurrent takers of a free lease, exactly one gets it."""
        clients = [await open_client() for _ in range(4)]
        results = await asyncio.gather(
            *(clients[i % 4].acquire_lease("hot", f"w{i}", 30) for i in range(32))
        )
        assert sum(results) == 1
        lease = await clients[0].get_lease("hot")
        assert lease is not None and lease.owner == f"w{results.index(True)}"

    # -- run metadata -------------------------------------------------------

    async def test_run_metadata_is_stored_and_listed(self, backend: Backend) -> None:
        """Metadata round-trips; listings are in id order, filtered and paged."""
        assert await backend.get_run("r1") is None
        a = _info("r1", "alpha")
        await backend.put_run(a)
        assert await backend.get_run("r1") == a
        done = a.with_status("completed")
        await backend.put_run(done)
        assert await backend.get_run("r1") == done
        await backend.put_run(_info("r2", "beta"))
        await backend.put_run(_info("r3", "alpha"))
        assert [r.run_id for r in await backend.list_runs()] == ["r1", "r2", "r3"]
        assert [r.run_id for r in await backend.list_runs(workflow="alpha")] == ["r1", "r3"]
        assert [r.run_id for r in await backend.list_runs(status="active")] == ["r2", "r3"]
        assert [r.run_id for r in await backend.list_runs(limit=2)] == ["r1", "r2"]
        assert [r.run_id for r in await backend.list_runs(after="r1")] == ["r2", "r3"]
        assert await backend.list_runs(limit=0) == []

    # -- wake-ups and lifecycle ---------------------------------------------

    async def test_an_event_wakes_a_waiting_client(self, open_client: Opener) -> None:
        """A client waiting for work wakes at once when another one makes work due."""
        waiter = await open_client()
        sender = await open_client()
        await waiter.due(time.time())  # start any listener the backend uses
        await asyncio.sleep(0.05)
        task = asyncio.create_task(waiter.wait_for_work(10))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await sender.send_event("w", "e", b"1")
        assert await asyncio.wait_for(task, 5) is True
        assert time.perf_counter() - t0 < 1.0

    async def test_waiting_times_out_when_nothing_happens(self, backend: Backend) -> None:
        """``wait_for_work`` returns False after its timeout when no work comes."""
        t0 = time.perf_counter()
        assert await backend.wait_for_work(0.2) is False
        assert 0.15 < time.perf_counter() - t0 < 2

    async def test_closing_twice_is_harmless(self, open_client: Opener) -> None:
        """``close`` may be called again; the second call does nothing."""
        backend = await open_client()
        await backend.append("c", 0, b"0")
        await backend.close()
        await backend.close()

    async def test_a_backend_never_closed_leaves_no_warning_at_exit(self, store: Store) -> None:
        """The seed's pattern (never close the backend) prints nothing at interpreter exit."""
        url = self._url(store)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-W",
            "error",
            "-c",
            _NEVER_CLOSED,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), _CHILD_TIMEOUT)
        assert (proc.returncode, out.decode(), err.decode()) == (0, "42\n", "")


#: The seed README's pattern: make a backend, run a worker, stop it, return; close nothing.
_NEVER_CLOSED = """
import asyncio
import sys

from substantial import Conductor, Context, workflow
from substantial.backends import from_url


@workflow()
async def example(c: Context, by: int = 1) -> int:
    return await c.save(lambda: 2 * by)


async def main() -> None:
    conductor = Conductor(from_url(sys.argv[1]))
    conductor.register(example)
    agent = conductor.run()
    run = await conductor.start(example, {"by": 21})
    print(await run.result(timeout=60))
    agent.cancel()
    await agent


asyncio.run(main())
"""
