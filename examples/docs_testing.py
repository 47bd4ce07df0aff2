"""docs/testing.md: run examples/trial_tests.py under pytest; print each test's outcome.

pytest's own report goes to stderr; stdout gets one line per test.
"""

import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).with_name("trial_tests.py")


class Outcomes:
    """A pytest plugin that keeps each test's outcome."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.failed:
            self.lines.append(f"{report.nodeid.split('::')[-1]}: {report.outcome}")


if __name__ == "__main__":
    outcomes = Outcomes()
    with contextlib.redirect_stdout(sys.stderr):
        status = pytest.main([str(TESTS), "-p", "no:cacheprovider"], plugins=[outcomes])
    print(*outcomes.lines, sep="\n")
    print("exit status:", int(status))
