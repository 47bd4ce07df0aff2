"""Which due runs a worker tries to lease when it cannot take them all."""

from __future__ import annotations

from substantial._runs import claim_order

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
