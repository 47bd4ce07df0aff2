"""Deterministic simulation: crashes after every write, and faults at every backend call.

First, for random workflows drawn by hypothesis (steps, async steps, steps
with compensations, sleeps, receives, gather, children, revert): each runs
once without faults, which counts the worker's durable writes W; then, for
every k in 1..W, again on a fresh in-memory store with the worker killed
right after its k-th write (tests/simulation.py), and a fresh worker
finishes the run. Every time: the same final result, every step whose
completion was recorded ran exactly once (one that was in flight at the
kill ran at most twice), every event was recorded exactly once and none is
left in an inbox. A failing case prints its program and k; re-run it with
``scenario(program, revert=..., crash_after=k)``.

Then seeds (tests/sim_seeds.py): each draws a workflow, a client's events and
faults at every backend call of the worker (errors, delays, lost replies,
deaths before or after a write), in virtual time. A failing seed is printed;
``SUBSTANTIAL_SIM_SEED=n`` runs that one alone, ``SUBSTANTIAL_SIM_SEEDS=10000``
runs more. Last, one test per defect the seeds found, each with the fault
placed by hand.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.sim_faults import DELAY, ERROR, LOST, OK, Scripted
from tests.sim_seeds import simulate
from tests.simulation import (
    Outcome,
    expected,
    receives,
    run_virtual,
    scenario,
    side_effects,
)

#: More examples with SUBSTANTIAL_SIM_EXAMPLES=200 (CI keeps it short).
EXAMPLES = int(os.environ.get("SUBSTANTIAL_SIM_EXAMPLES", "20"))

leaf = st.one_of(
    st.tuples(st.sampled_from(["step", "astep", "comp"])).map(list),
    st.tuples(st.just("sleep"), st.integers(0, 3)).map(list),
    st.tuples(st.just("recv"), st.sampled_from(["a", "b"])).map(list),
)
# Children receive no events (the test sends only to the parent) and do not nest further.
child_leaf = st.one_of(
    st.tuples(st.sampled_from(["step", "astep"])).map(list),
    st.tuples(st.just("sleep"), st.integers(0, 2)).map(list),
)
gathered = st.tuples(st.just("gather"), st.lists(leaf, min_size=1, max_size=3)).map(list)
child = st.tuples(st.just("child"), st.lists(child_leaf, min_size=1, max_size=3)).map(list)
programs = st.lists(st.one_of(leaf, leaf, gathered, child), min_size=1, max_size=6)


def check(program: list[Any], revert: bool, reference: Outcome, out: Outcome, k: int) -> None:
    where = f"program={program!r} revert={revert} crash_after={k}"
    assert out.result == reference.result, where
    steps = side_effects(program, revert)
    for sid in steps:
        ran = out.ledger[sid]
        if sid in out.recorded_at_crash:
            assert ran == 1, f"{where}: recorded step {sid} ran {ran} times"
        else:
            assert 1 <= ran <= 2, f"{where}: step {sid} ran {ran} times"
    assert set(out.ledger) == set(steps), where
    sent = {f"e{i}" for i in range(len(receives(program)))}
    # Sent events and the children's reports of their ends: each recorded once.
    assert sent <= set(out.events_recorded), where
    assert all(n == 1 for n in out.events_recorded.values()), (where, out.events_recorded)
    assert out.inbox_left == 0, where


#: Programs run and crashes injected so far in this process (printed with -s).
TOTALS: Counter[str] = Counter()


async def crash_everywhere(program: list[Any], revert: bool, idle_timeout: float) -> int:
    reference = await scenario(program, revert=revert, crash_after=None, idle_timeout=idle_timeout)
    assert not reference.crashed
    assert reference.result == expected(program, revert=revert)
    assert all(n == 1 for n in reference.ledger.values()), reference.ledger
    k = 0
    while True:
        k += 1
        out = await scenario(program, revert=revert, crash_after=k, idle_timeout=idle_timeout)
        check(program, revert, reference, out, k)
        if not out.crashed:
            TOTALS.update(programs=1, crashes=k - 1)
            return k - 1  # this run made fewer than k writes: every write has had its crash
        assert k < 500, "the run never ends"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=programs, revert=st.booleans(), evict=st.booleans())
# A child's report sent again by its retried end once its parent had taken it: it stayed
# in the ended parent's inbox (a crash after the report, k=7).
@example(program=[["child", [["step"]]], ["astep"]], revert=False, evict=False)
def test_a_crash_after_any_write_changes_nothing(
    program: list[Any], revert: bool, evict: bool
) -> None:
    # evict: runs leave memory as soon as they wait, so every wait goes through the due index.
    crashes = run_virtual(lambda: crash_everywhere(program, revert, 0.001 if evict else 60.0))
    assert crashes >= 3
    print(f"simulation: {TOTALS['programs']} programs, {TOTALS['crashes']} crashes, all recovered")


#: Seeds CI runs (about 20 s on a loaded 2-core machine); SUBSTANTIAL_SIM_SEEDS=20000 runs more.
SEEDS = int(os.environ.get("SUBSTANTIAL_SIM_SEEDS", "3000"))
FIRST_SEED = int(os.environ.get("SUBSTANTIAL_SIM_FIRST_SEED", "0"))


def test_every_seed_keeps_every_invariant() -> None:
    one = os.environ.get("SUBSTANTIAL_SIM_SEED")
    seeds = [int(one)] if one else range(FIRST_SEED, FIRST_SEED + SEEDS)
    totals: Counter[str] = Counter()
    failures: list[str] = []
    for seed in seeds:
        try:
            world = simulate(seed)
        except AssertionError as exc:
            failures.append(f"SUBSTANTIAL_SIM_SEED={seed}: {exc}")
            if len(failures) == 3:
                break
            continue
        totals.update(world.faults)
        totals.update(
            seeds=1,
            processes=world.processes,
            deaths=world.deaths,
            steps=world.audit.calls,
            in_flight=world.audit.in_flight,
            unexplained=world.audit.unexplained,
            windows=world.windows,
        )
    faults = sum(totals[f] for f in ("error", "delay", "lost", "crash-before", "crash-after"))
    print(
        f"deterministic simulation: {totals['seeds']} seeds, {faults} faults injected "
        f"({totals['error']} errors, {totals['delay']} delays, {totals['lost']} lost replies, "
        f"{totals['crash-before']} deaths before and {totals['crash-after']} after a call), "
        f"{totals['processes']} worker processes, {totals['steps']} step calls, "
        f"{totals['in_flight']} re-run after a death with the step in flight, "
        f"{totals['unexplained']} re-run otherwise; {totals['windows']} run(s) in the known "
        "window of eviction (woken as a restart would)"
    )
    assert not failures, "\n\n".join(failures)
    # No fault but a death may run a step twice: errors, delays and lost replies never do.
    assert totals["unexplained"] == 0
    if not one:
        assert totals["deaths"] > SEEDS / 10 and totals["lost"] > SEEDS / 10


def test_a_seed_replays_the_same_calls_in_the_same_order() -> None:
    for seed in range(20):
        assert simulate(seed).fingerprint == simulate(seed).fingerprint, f"seed {seed}"


def _at(run_id: str, position: int | None = None) -> Any:
    return lambda args: args[0] == run_id and (position is None or args[1] == position)


def _unacked_read(args: tuple[Any, ...]) -> bool:
    return args[0] == "sim"


@pytest.mark.parametrize(
    ("program", "rules"),
    [
        # The reply to a log write is lost while another step runs: the retry finds the
        # entry written and goes on (the run was given up, the running step run again).
        ([["gather", [["step"], ["astep", 50]]]], [(LOST, "append", _at("sim", 1))]),
        # The inbox cannot be read while a step runs: read it later (the run was given
        # up, and the running step run again).
        (
            [["gather", [["astep", 50], ["recv", "b"]]]],
            [(OK, "read_inbox", _unacked_read), (ERROR, "read_inbox", _unacked_read)],
        ),
        # A child's start meets an outage: start it when the store is back (the run
        # failed with ChildFailed).
        ([["child", [["step"]]]], [(ERROR, "append", _at("sim:0", 0))]),
        # A run leaves memory, an event arrives, and the store fails between taking the
        # run out of the due index and reading its inbox again: it is tried again (the
        # run stayed out of the index with its event, for ever).
        (
            [["recv", "b"]],
            [(DELAY, "set_due", lambda args: args[1] is None), (ERROR, "read_inbox", _at("sim"))],
        ),
    ],
    ids=["lost-append-reply", "inbox-outage", "child-start-outage", "hand-back-outage"],
)
def test_a_fault_placed_by_hand_runs_no_step_twice(program: list[Any], rules: Any) -> None:
    out = run_virtual(
        lambda: scenario(
            program, revert=False, crash_after=None, idle_timeout=0.001, faults=Scripted(rules)
        )
    )
    assert out.result == expected(program)
    assert all(n == 1 for n in out.ledger.values()), out.ledger
    assert set(out.ledger) == set(side_effects(program, False))
    assert out.inbox_left == 0
