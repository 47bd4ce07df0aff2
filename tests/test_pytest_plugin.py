"""The pytest plugin, as a user meets it: a real inner pytest run of a user's test file.

The plugin is found through its ``pytest11`` entry point (nothing in the
inner run names it), and the user's async tests run under pytest-asyncio
(strict or auto mode) or anyio, whichever the user has.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

#: The inner runs turn warnings into errors too. pytest rewrites the asserts of a plugin's
#: distribution, and warns that it cannot when (as here, in-process) it is imported already.
STRICT = (
    "-p",
    "no:cacheprovider",
    "-W",
    "error",
    "-W",
    "ignore::pytest.PytestAssertRewriteWarning",
)

#: The user's workflows and tests; ``MARK`` is how their async plugin wants tests marked.
USER_TESTS = """
import time
from datetime import timedelta

import pytest

from substantial import Context, ReceiveTimeout, _clock, workflow
from substantial.testing import WorkflowEnv

DAY = timedelta(days=1)


@workflow()
async def trial(c: Context, user: str) -> str:
    await c.sleep(30 * DAY)
    return f"reminded {user}"


@workflow()
async def approval(c: Context) -> list[str]:
    seen = [c.now().isoformat()]
    try:
        seen.append(str(await c.receive("approve", timeout=2 * DAY)))
    except ReceiveTimeout:
        seen.append("expired")
    seen.append(c.now().isoformat())
    return seen


MARK
async def test_thirty_days_in_milliseconds(substantial_env: WorkflowEnv) -> None:
    wall = time.monotonic()
    run = await substantial_env.start(trial, {"user": "ada"})
    assert await substantial_env.result(run) == "reminded ada"
    assert time.monotonic() - wall < 5, "the test slept for real"
    ended = [r for r in await substantial_env.records(run) if r["k"] == "end"]
    assert ended and ended[0]["t"] - time.time() >= 30 * 86400 - 5


MARK
async def test_event_sent_after_a_skipped_day(substantial_env: WorkflowEnv) -> None:
    run = await substantial_env.start(approval)
    await substantial_env.skip(DAY)
    assert (await substantial_env.status(run)).status == "active"
    await substantial_env.send(run, "approve", "yes")
    started, answer, answered = await substantial_env.result(run)
    assert answer == "yes"
    assert DAY <= _parse(answered) - _parse(started) < 2 * DAY


MARK
async def test_skipping_past_a_timeout(substantial_env: WorkflowEnv) -> None:
    run = await substantial_env.start(approval)
    await substantial_env.skip(3 * DAY)
    info = await substantial_env.status(run)
    assert info.status == "completed" and info.output[1] == "expired"
    started, _, ended = info.output
    # The timeout fired at its own time, not at the end of the skip.
    assert 2 * DAY <= _parse(ended) - _parse(started) < 2 * DAY + timedelta(seconds=5)


MARK
async def test_a_wrong_expectation_fails(substantial_env: WorkflowEnv) -> None:
    run = await substantial_env.start(trial, {"user": "bob"})
    assert await substantial_env.result(run) == "reminded ada"


MARK
async def test_left_waiting_and_failing(substantial_env: WorkflowEnv) -> None:
    await substantial_env.start(trial, {"user": "cy"})
    await substantial_env.skip(DAY)
    raise RuntimeError("the test broke off while a run waits")


def test_the_next_test_sees_real_time_again() -> None:
    assert _clock.offset == 0


def _parse(text):
    from datetime import datetime

    return datetime.fromisoformat(text)
"""

ANYIO_BACKEND = """
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
"""

#: A user's own store for the environment: overriding ``substantial_backend``.
SQLITE_CONFTEST = """
import pytest
from substantial.backends.sqlite import SQLiteBackend

class Closing(SQLiteBackend):
    async def close(self) -> None:
        await super().close()
        print("store closed")

@pytest.fixture
def substantial_backend(tmp_path):
    return Closing(tmp_path / "runs.db")
"""

ON_SQLITE = """
from datetime import timedelta
import pytest
from substantial import Context, workflow

@workflow()
async def nap(c: Context) -> str:
    await c.sleep(timedelta(days=7))
    return "rested"

@pytest.mark.asyncio
async def test_on_sqlite(substantial_env) -> None:
    run = await substantial_env.start(nap)
    assert await substantial_env.result(run) == "rested"
    assert "sqlite" in substantial_env.backend.describe()

def test_the_plugin_is_loaded_from_its_entry_point(pytestconfig) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("substantial")  # -p no:substantial
    assert plugin.__name__ == "substantial.testing.pytest_plugin"
"""


def test_under_pytest_asyncio_strict_and_anyio(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_strict=USER_TESTS.replace("MARK", "@pytest.mark.asyncio"),
        test_anyio=USER_TESTS.replace("MARK", "@pytest.mark.anyio") + ANYIO_BACKEND,
    )
    sqlite = pytester.mkpydir("sqlite")
    (sqlite / "conftest.py").write_text(SQLITE_CONFTEST)
    (sqlite / "test_sqlite.py").write_text(ON_SQLITE)
    result = pytester.runpytest(*STRICT, "-s")
    result.assert_outcomes(passed=4 + 4 + 2, failed=2 + 2)
    for module in ("test_strict", "test_anyio"):
        result.stdout.fnmatch_lines(
            [
                f"FAILED {module}.py::test_a_wrong_expectation_fails*AssertionError*",
                f"FAILED {module}.py::test_left_waiting_and_failing*RuntimeError*",
            ]
        )
    result.stdout.fnmatch_lines(["*'reminded bob' == 'reminded ada'*"])
    # The overriding store was closed in the test's own loop, by the environment.
    result.stdout.fnmatch_lines(["*store closed*"])


def test_under_pytest_asyncio_auto_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_auto=USER_TESTS.replace("MARK", ""))
    result = pytester.runpytest(*STRICT)
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines(["*'reminded bob' == 'reminded ada'*"])
