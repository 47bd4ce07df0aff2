"""The conformance suite, part three: leases, metadata, wake-ups and life cycle.

``lease``, ``put_run``, ``list_runs``, ``wait_for_work`` and ``close``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from substantial.backends.base import Backend, Capabilities, Lease
from substantial.errors import InvalidArgument
from substantial.testing._support import CHILD_TIMEOUT, NEVER_CLOSED, Opener, Store, info, url_of

__all__ = ["LeaseTests", "LifecycleTests", "RunTests"]


def _held_by(lease: Lease | None, owner: str) -> bool:
    return lease is not None and lease.owner == owner


class LeaseTests:
    """One compare-and-set operation takes, renews and gives up a lease; it also reads."""

    async def test_a_lease_is_taken_renewed_and_given_up(self, backend: Backend) -> None:
        """Only its holder renews or gives up a live lease; a failed take shows the holder."""
        assert await backend.lease("r") is None
        taken = await backend.lease("r", "alice", 30)
        assert _held_by(taken, "alice")
        assert taken is not None and taken.expires_at == pytest.approx(time.time() + 30, abs=2)
        assert await backend.lease("r") == taken  # reading changes nothing
        assert await backend.lease("r", "bob", 30) == taken  # held: left as it is, and shown
        renewed = await backend.lease("r", "alice", 60)
        assert renewed is not None and renewed.expires_at == pytest.approx(time.time() + 60, abs=2)
        assert await backend.lease("r", "bob", 0) == renewed  # not bob's to give up
        assert await backend.lease("r", "alice", 0) is None
        assert await backend.lease("r") is None
        assert _held_by(await backend.lease("r", "bob", 30), "bob")

    async def test_a_lease_expires(self, backend: Backend) -> None:
        """After its ttl, a lease is anyone's."""
        # Short enough to wait for. A store's round trips can outlast it on a loaded machine:
        # then bob's try says nothing about the ttl, and only the expiry is checked.
        started = time.monotonic()
        assert _held_by(await backend.lease("r", "alice", 1.0), "alice")
        tried = await backend.lease("r", "bob", 10)
        if time.monotonic() - started < 0.9:
            assert _held_by(tried, "alice")
        await asyncio.sleep(1.2)
        assert _held_by(await backend.lease("r", "bob", 10), "bob")
        assert _held_by(await backend.lease("r", "alice", 10), "bob")

    async def test_a_lease_is_taken_over_only_from_the_named_owner(self, backend: Backend) -> None:
        """``take_from`` takes a live lease from that owner only."""
        await backend.lease("r", "alice", 30)
        assert _held_by(await backend.lease("r", "bob", 30, take_from="carol"), "alice")
        assert _held_by(await backend.lease("r", "bob", 30, take_from="alice"), "bob")
        assert _held_by(await backend.lease("r"), "bob")

    async def test_concurrent_lease_takers_exactly_one_wins(self, open_client: Opener) -> None:
        """Of many concurrent takers of a free lease, exactly one gets it; all see the winner."""
        clients = [await open_client() for _ in range(4)]
        leases = await asyncio.gather(
            *(clients[i % 4].lease("hot", f"w{i}", 30) for i in range(32))
        )
        winners = {lease.owner for lease in leases if lease is not None}
        assert len(winners) == 1
        (winner,) = winners
        assert sum(_held_by(lease, f"w{i}") for i, lease in enumerate(leases)) == 1
        assert _held_by(await clients[0].lease("hot"), winner)

    async def test_a_ttl_must_be_a_finite_number_of_seconds(self, backend: Backend) -> None:
        """A negative, infinite or non-number ttl raises InvalidArgument."""
        for bad in (-1, float("inf"), float("nan"), "30"):
            with pytest.raises(InvalidArgument, match="ttl"):
                await backend.lease("r", "me", bad)  # type: ignore[arg-type]
        assert await backend.lease("r") is None


class RunTests:
    """Run metadata: replaced atomically, listed in id order, filtered, paged, by ids."""

    async def test_run_metadata_is_stored_and_listed(self, backend: Backend) -> None:
        """Metadata round-trips; listings are in id order, filtered and paged."""
        assert await backend.list_runs(ids=["r1"]) == []
        a = info("r1", "alpha")
        await backend.put_run(a)
        assert await backend.list_runs(ids=["r1"]) == [a]
        done = a.with_status("completed")
        await backend.put_run(done)
        assert await backend.list_runs(ids=["r1"]) == [done]
        await backend.put_run(info("r2", "beta"))
        await backend.put_run(info("r3", "alpha"))
        assert [r.run_id for r in await backend.list_runs()] == ["r1", "r2", "r3"]
        assert [r.run_id for r in await backend.list_runs(workflow="alpha")] == ["r1", "r3"]
        assert [r.run_id for r in await backend.list_runs(status="active")] == ["r2", "r3"]
        assert [r.run_id for r in await backend.list_runs(limit=2)] == ["r1", "r2"]
        assert [r.run_id for r in await backend.list_runs(after="r1")] == ["r2", "r3"]
        assert await backend.list_runs(limit=0) == []
        by_ids = await backend.list_runs(ids=["r3", "nope", "r1", "r3"])
        assert [r.run_id for r in by_ids] == ["r1", "r3"]
        only = await backend.list_runs(ids=["r1", "r2"], status="active")
        assert [r.run_id for r in only] == ["r2"]


class LifecycleTests:
    """Wake-ups as the backend declares them, and closing, even never."""

    async def test_the_capabilities_are_declared(self, backend: Backend) -> None:
        """A backend says what it offers beyond the contract: nothing is guessed."""
        assert isinstance(backend.capabilities, Capabilities)

    async def test_an_event_wakes_a_waiting_client(self, open_client: Opener) -> None:
        """A waiting client wakes when another makes work due: at once with wake-ups."""
        waiter = await open_client()
        sender = await open_client()
        await waiter.due(time.time())  # start any listener the backend uses
        await asyncio.sleep(0.05)
        task = asyncio.create_task(waiter.wait_for_work(30))
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await sender.set_due("w", time.time())
        assert await asyncio.wait_for(task, 40) is True
        # Without wake-ups, other clients' work is found by polling: slower, never missed.
        bound = 1.0 if waiter.capabilities.wake_ups else 20.0
        assert time.perf_counter() - t0 < bound

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
        url = url_of(store)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-W",
            "error",
            "-c",
            NEVER_CLOSED,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT)
        assert (proc.returncode, out.decode(), err.decode()) == (0, "42\n", "")
