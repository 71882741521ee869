"""The README's test command ends here: the whole suite (lint gates are tests too).

``./bootstrap.sh test [pytest args]``. In CI (CI=true) a skipped test fails the run
(see tests/conftest.py); exit code 5 (no tests collected) is a failure as well."""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Any

import pytest


class FileTimes:
    """Wall time per test file (setup + call + teardown), printed at the end: where the
    suite's minutes go, also in a CI log that keeps only its tail."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid.split("::", 1)[0]] += report.duration

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        top = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:20]
        terminalreporter.section("minutes per test file (top 20)")
        for path, seconds in top:
            terminalreporter.write_line(f"{seconds / 60:6.1f}  {path}")


def main() -> int:
    args = sys.argv[1:] or ["tests"]
    started = time.monotonic()
    code = pytest.main(["--durations=15", "-o", "console_output_style=count", *args], plugins=[FileTimes()])
    minutes = (time.monotonic() - started) / 60
    print(f"cairn test suite: exit {int(code)} after {minutes:.1f} min (CI={os.environ.get('CI', '')})",
          file=sys.stderr)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("no tests were collected: that is a failure")
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
