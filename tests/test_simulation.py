"""Deterministic crash simulation: for random workflows, kill the worker after every write.

Each program is drawn by hypothesis (steps, async steps, steps with
compensations, sleeps, receives, gather, children, revert). It runs once
without faults, which counts the worker's durable writes W; then, for every
k in 1..W, it runs again on a fresh in-memory store with the worker killed
right after its k-th write (tests/simulation.py), and a fresh worker
finishes the run. Every time: the same final result, every step whose
completion was recorded ran exactly once (one that was in flight at the
kill ran at most twice), every event was recorded exactly once and none is
left in an inbox. A failing case prints its program and k; re-run it with
``scenario(program, revert=..., crash_after=k)``.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.simulation import Outcome, compensated, effects, receives, scenario

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
    steps = effects(program) + [f"undo:{s}" for s in (compensated(program) if revert else [])]
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
def test_a_crash_after_any_write_changes_nothing(
    program: list[Any], revert: bool, evict: bool
) -> None:
    # evict: runs leave memory as soon as they wait, so every wait goes through the due index.
    crashes = asyncio.run(crash_everywhere(program, revert, 0.001 if evict else 60.0))
    assert crashes >= 3
    print(f"simulation: {TOTALS['programs']} programs, {TOTALS['crashes']} crashes, all recovered")
