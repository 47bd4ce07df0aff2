"""The examples in docs/ run as written and print what the pages say they print.

Every ``examples/docs_*.py`` must have its expected output here, and every
``file::test`` a docs page cites as evidence must exist, so the docs cannot rot.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    "steps",
    "waiting",
    "determinism",
    "long-runs",
    "guarantees",
    "concurrency",
    "schedules",
    "queues",
    "versioning",
    "repair",
    "retention",
    "testing",
    "codecs",
    "SECURITY",
    "RELIABILITY",
]
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("docs_*.py"))

NONDETERMINISM = (
    "run 'order-1' is not deterministic at command 0 (log position 1): the log recorded "
    "step 'reserve', but the code now asks for step 'price'. Keep the old code registered for "
    "runs in flight (give the changed workflow a new version=, see docs/versioning.md), or "
    "cancel the run."
)

EXPECTED: dict[str, list[str]] = {
    "docs_concurrency": [
        "ten 100 ms lookups took under 0.5 s: True",
        "results in issue order: True",
        "replayed to the same end: True | lookups run again: 0",
        "approval: approved by ana",
        "approval: no answer in time",
        "first quote: child quote",
        "basket total: 60",
        "published total: 60",
        "streamed lines: ['pen', 'ink']",
        "children: [('basket-1:0', 'completed'), ('basket-1:1', 'completed')]",
        "checked: failed: no price for 'broken'",
        "report: timed_out | WorkflowTimeout",
    ],
    "docs_compensation": [
        "run 'trip-1' was reverted: its compensations ran",
        "compensations, newest first: ['cancel hotel', 'cancel flight LH-400']",
        "status: reverted",
    ],
    "docs_determinism": [
        "function executions: 2",
        "same values on replay: True",
        "winner is the recorded draw: True",
        "c.log lines emitted: 1",
        "NonDeterminismError",
        NONDETERMINISM,
    ],
    "docs_durable_sleep": [
        "held in memory after eviction: False",
        "status with no worker: active",
        "slept at least 1 s: True",
    ],
    "docs_golden": [
        "golden log: ['start', 'step', 'step']",
        "same code: {'item': 'lamp', 'stock': 'stock-17', 'amount': 41.5, 'paid': 'card-ok'}"
        " | steps re-run: []",
        "changed code: NonDeterminismError",
    ],
    "docs_long_runs": [
        "exported: 6",
        "  export: continued {'next': 'export+1'}",
        "  export+1: continued {'next': 'export+2'}",
        "  export+2: continued {'next': 'export+3'}",
        "  export+3: completed 6",
        "letters sent to 'mail', received by mail+2: ['before', 'after']",
        "ledger: {'account': 'acct-1', 'balance': 20, 'entries': 7}",
        "snapshots: 2 | setup ran: 1 time(s)",
        "replay starts at a snapshot: True",
        "entries before it are still stored: 3 of 5",
    ],
    "docs_patching": [
        "order-1 (finished on the old code) replays on the new: True",
        "order-2 (in flight): ['reserved desk', 'insured desk', 'shipped desk']",
        "order-3 (new): ['reserved chair', 'insured chair', 'shipped chair']",
        "order-3 recorded the marker: ['insure-before-shipping']",
    ],
    "docs_queues": [
        "mail: at most at once: 2",
        "priority order: ['first', 'high', 'high-2', 'mid', 'low']",
        "per customer at once: 1 1",
        "7 runs at 3 per 0.5 s took at least 1 s: True",
        "dedup: True dedup:mail:welcome-ann",
        "debounce: ['sent to draft-3', 'sent to draft-3', 'sent to draft-3', 'sent to draft-3']",
        "delay: sent to later | waited: True",
        "children: 6 | at most at once: 2",
    ],
    "docs_schedules": [
        "runs started: True",
        "a run's id names its tick: True",
        "result: True",
        "every: 0:00:00.200000 | catch_up: latest",
        "runs while paused: 0",
        "trigger: True",
        "schedules left: []",
        "backfill: ['schedule:nightly:20250329T013000Z', 'schedule:nightly:20250330T010000Z',"
        " 'schedule:nightly:20250331T003000Z']",
        "a second backfill starts: 0 runs",
    ],
    "docs_steps": [
        "total: 83",
        "charge: ch_123",
        "stock: StepTimeout after 1 attempt(s)",
        "stock via a lambda: StepTimeout: the step took longer than its timeout of 0.05s",
        "upstream: TimeoutError: upstream read timed out",
        "a tuple step handed the workflow: list [40, 'EUR']",
        "sync step with timeout ran in a thread: True",
        "the same quick function ran on the loop the second time: True",
        "keyed step returned the first value: True",
        "calls: {'load_config': 1, 'fetch_price': 1, 'charge_card': 3}",
        "log:",
        "  0: start",
        "  1: step load_config",
        "  2: step fetch-price",
        "  3: step total",
        "  4: attempt charge_card #1 ConnectionError",
        "  5: attempt charge_card #2 ConnectionError",
        "  6: step charge_card",
        "  7: step check_stock failed: StepTimeout",
        "  8: step stock-via-lambda failed: StepTimeout",
        "  9: step call_upstream failed: TimeoutError",
        "  10: step quote",
        "  11: step sync-with-timeout",
        "  12: step sync-without-timeout",
        "  12: end",
    ],
    "docs_testing": [
        "test_the_trial_ends_after_thirty_days: passed",
        "test_an_upgrade_on_day_ten: passed",
        "exit status: 0",
    ],
    "docs_versions": [
        "order-1 on a v2-only worker: active",
        "order-1 finishes on v1: {'version': 1, 'stock': 'stock-17', 'paid': 'card'}",
        "order-2 starts on v2: {'version': 2, 'stock': 'stock-17', 'amount': 41.5, 'paid': 'cash'}",
        "active version-1 runs left: []",
    ],
    "docs_waiting": [
        "cart: ['apple', 'pear']",
        "send after the end: run 'cart-1' has ended (completed): it can no longer receive events",
        "send to an unknown run: no run with id 'cart-9' in memory: start it first",
        "reminder: reminder sent",
        "slept at least 0.2 s: True",
        "approval: decided: yes",
        "approval: escalated: no decision in time",
        "receive by name: ['a', 'b']",
        "heartbeat: RunCancelled cancelled",
    ],
}


def test_every_docs_example_has_expected_output() -> None:
    assert EXAMPLES, "no examples/docs_*.py found"
    assert sorted(EXPECTED) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_docs_example_runs_and_prints_what_the_docs_say(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", f"examples.{name}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXPECTED[name], proc.stderr
    assert list(tmp_path.iterdir()) == [], "an example left files behind"


def _page(name: str) -> str:
    return (ROOT / "docs" / f"{name}.md").read_text()


@pytest.mark.parametrize("page", DOCS)
def test_examples_named_by_a_page_exist(page: str) -> None:
    for name in re.findall(r"examples/(docs_\w+)\.py", _page(page)):
        assert name in EXAMPLES, f"docs/{page}.md names examples/{name}.py, which is missing"


@pytest.mark.parametrize("page", DOCS)
def test_tests_cited_by_a_page_exist(page: str) -> None:
    # Tests live in tests/, and the shipped backend suite in substantial/testing/ (methods).
    cited = re.findall(r"((?:tests|substantial/testing)/\w+\.py)::(test_\w+)", _page(page))
    if page == "guarantees":
        assert len(cited) >= 12, "docs/guarantees.md should cite the tests behind each guarantee"
    for path, test in cited:
        source = ROOT / path
        assert source.exists(), f"docs/{page}.md cites {path}, which does not exist"
        assert re.search(rf"^(    )?(async )?def {test}\(", source.read_text(), re.M), (
            f"docs/{page}.md cites {path}::{test}, which does not exist"
        )


def _anchors(text: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", DOCS)
def test_links_between_pages_resolve(page: str) -> None:
    for target, anchor in re.findall(r"\]\(([\w.-]+\.md)?#([\w-]+)\)", _page(page)):
        linked = target[:-3] if target else page
        assert (ROOT / "docs" / f"{linked}.md").exists(), f"docs/{page}.md links to {target}"
        assert anchor in _anchors(_page(linked)), f"docs/{page}.md links to {target}#{anchor}"
