"""Which due runs a worker tries to lease when it cannot take them all."""

from __future__ import annotations

import asyncio

from substantial import Conductor, Context, workflow
from substantial._peers import DEFER, WINDOW, Peers, claim_order
from substantial.backends.base import make_owner
from substantial.backends.memory import MemoryBackend

DUE = [(f"run-{i:03d}", 1_000.5) for i in range(100)]


def test_workers_seeing_the_same_due_list_try_different_runs_first() -> None:
    # Fixed names keep the test deterministic (make_owner's are random).
    owners = [f"w-host-{i}-{1000 + i}" for i in range(4)]
    chosen = [{run for run, _ in claim_order(o, DUE, 10)} for o in owners]
    assert all(len(c) == 10 for c in chosen)
    # In due order all four would race for run-000..run-009; spread, a run is
    # wanted by more than one worker only by chance.
    wanted_twice = sum(len(chosen[a] & chosen[b]) for a in range(4) for b in range(a + 1, 4))
    assert wanted_twice <= 12
    assert len(set.union(*chosen)) >= 30


def test_a_run_due_in_an_earlier_second_goes_first() -> None:
    late = [(f"new-{i:03d}", 2_000.25) for i in range(50)]
    old = [("old-run", 1_999.0)]
    for owner in (f"w-host-{i}" for i in range(8)):
        chosen = claim_order(owner, old + late, 3)
        assert chosen[0] == ("old-run", 1_999.0)
        assert len(chosen) == 3


def test_with_room_for_all_the_due_order_stands() -> None:
    assert claim_order("w-a", DUE, 100) == DUE
    assert claim_order("w-a", DUE, 500) == DUE
    assert claim_order("w-a", DUE, 0) == []
    assert claim_order("w-a", [], 5) == []


def test_one_worker_ranks_the_same_way_on_every_poll() -> None:
    # Stable per worker: a run it ranked high stays high, not reshuffled each poll.
    assert claim_order("w-x", DUE, 10) == claim_order("w-x", list(reversed(DUE)), 10)


# -- workers share out new runs once they have seen each other ---------------------------


def test_alone_a_worker_goes_first_for_every_run() -> None:
    peers = Peers("w-a")
    assert peers.split(DUE, 10.0) == (DUE, [])


def test_seen_peers_each_go_first_for_their_own_share() -> None:
    names = [f"w-host-{i}" for i in range(4)]
    firsts = []
    for name in names:
        peers = Peers(name)
        for other in names:
            peers.saw(other, 10.0)
        mine, look = peers.split(DUE, 10.0)
        assert look == []  # the others' runs are left to them for DEFER first
        firsts.append({run for run, _ in mine})
    # Every run has exactly one first choice among the four.
    assert sum(len(f) for f in firsts) == len(DUE)
    assert set.union(*firsts) == {run for run, _ in DUE}
    assert all(10 <= len(f) <= 45 for f in firsts), [len(f) for f in firsts]


def test_a_run_left_to_a_peer_is_looked_at_after_the_pause() -> None:
    peers = Peers("w-a")
    peers.saw("w-b", 10.0)
    mine, look = peers.split(DUE, 10.0)
    theirs = [c for c in DUE if c not in mine]
    assert theirs and look == []
    assert peers.next_at(10.0) == 10.0 + DEFER
    mine_later, look_later = peers.split(DUE, 10.0 + DEFER)
    assert mine_later == mine and look_later == theirs
    # A peer not seen for WINDOW is gone: this worker goes first for everything again.
    peers.forget(10.0 + WINDOW + 1)
    assert peers.split(DUE, 10.0 + WINDOW + 1) == (DUE, [])


def test_an_unreadable_lease_owner_or_a_repair_is_no_peer() -> None:
    me = make_owner("w")
    peers = Peers(me)
    peers.saw("?", 1.0)
    peers.saw(me, 1.0)
    for tag in ("resume-", "delete-", "prune-", "retention-"):
        peers.saw(make_owner(tag), 1.0)
    assert peers.split(DUE, 1.0) == (DUE, [])
    peers.saw(make_owner("w"), 1.0)  # another worker
    assert peers.split(DUE, 1.0) != (DUE, [])


@workflow()
async def ten_saves(c: Context) -> int:
    for i in range(10):
        await c.save(lambda i=i: i)
    return 10


class _CountingLeases(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.takes = 0

    async def lease(self, run_id, owner=None, ttl=0.0, *, take_from=None):  # type: ignore[no-untyped-def]
        if owner is not None and ttl > 0:
            self.takes += 1
        return await super().lease(run_id, owner, ttl, take_from=take_from)


async def test_four_workers_on_one_store_do_not_all_race_for_each_new_run() -> None:
    store = _CountingLeases()
    conductors = [Conductor(store) for _ in range(4)]
    for c in conductors:
        c.register(ten_saves)
    agents = [c.run(poll_interval=0.05) for c in conductors]
    try:
        # The first runs teach the workers about each other (each loses some races).
        warm = [await conductors[0].start(ten_saves) for _ in range(20)]
        assert [await r.result(timeout=30) for r in warm] == [10] * 20
        before = store.takes
        runs = [await conductors[0].start(ten_saves) for _ in range(200)]
        assert [await r.result(timeout=60) for r in runs] == [10] * 200
        # All racing for each run would be about 4 lease writes per run.
        assert (store.takes - before) / 200 < 1.6, (store.takes - before) / 200
    finally:
        for agent in agents:
            agent.cancel()
        await asyncio.gather(*agents, return_exceptions=True)
        for c in conductors:
            await c.close()


async def test_a_backlog_larger_than_the_worker_drains_without_waiting_for_the_poll() -> None:
    # 60 runs due at once, room for 5: each run that ends frees room, and the worker
    # polls again then, not a poll interval later (12 rounds of 60 s before).
    store = MemoryBackend()
    conductor = Conductor(store)
    conductor.register(ten_saves)
    runs = [await conductor.start(ten_saves) for _ in range(60)]
    agent = conductor.run(poll_interval=60.0, concurrency=5)
    try:
        assert [await r.result(timeout=30) for r in runs] == [10] * 60
    finally:
        agent.cancel()
        await asyncio.gather(agent, return_exceptions=True)
        await conductor.close()
