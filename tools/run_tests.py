"""The README's test command ends here: the whole suite (lint gates are tests too).

``./bootstrap.sh test [pytest args]``. In CI (CI=true) a skipped test fails the run
(see tests/conftest.py); exit code 5 (no tests collected) is a failure as well.

The whole suite runs as two pytest sessions side by side: the lab cluster's tests
(``tests/cluster``: three nodes in network namespaces, mostly waiting for leases to
expire, failovers and reboots) in a child process, everything else here. They share
nothing but the machine (each stack owns its names; the lab lives in its own
namespaces), and together they take the time of the longer one instead of the sum.
``CAIRN_TEST_SERIAL=1`` runs them one after the other; explicit pytest arguments run
just those, in one session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

LAB_TESTS = "tests/cluster"


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


def run_session(args: list[str]) -> int:
    code = pytest.main(["--durations=15", "-o", "console_output_style=count", *args], plugins=[FileTimes()])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("no tests were collected: that is a failure")
        return 1
    return int(code)


def run_split() -> int:
    """The lab's tests in a child session (output to a file, printed when both ended),
    the rest here."""
    log = Path(tempfile.mkstemp(prefix="cairn-lab-tests-", suffix=".log")[1])
    print(f"the lab cluster's tests ({LAB_TESTS}) run beside this session; their output: {log}", flush=True)
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "tools.run_tests", LAB_TESTS], stdout=out,
                                 stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    try:
        main_code = run_session(["tests", f"--ignore={LAB_TESTS}"])
        lab_code = child.wait()
    except BaseException:
        child.send_signal(signal.SIGINT)  # pytest's KeyboardInterrupt: its fixtures take the lab down
        child.wait(600)
        raise
    print(f"\n{'=' * 30} the lab cluster's session ({LAB_TESTS}) {'=' * 30}", flush=True)
    sys.stdout.write(log.read_text(errors="replace"))
    log.unlink(missing_ok=True)  # printed: nothing of the run stays in /tmp
    print(f"\nsessions: everything else exit {main_code}, the lab cluster's tests exit {lab_code}")
    return main_code or lab_code


def main() -> int:
    args = sys.argv[1:]
    started = time.monotonic()
    if args:
        code = run_session(args)
    elif os.environ.get("CAIRN_TEST_SERIAL", "").lower() in ("1", "true", "yes"):
        code = run_session(["tests"])
    else:
        code = run_split()
    minutes = (time.monotonic() - started) / 60
    print(f"cairn test suite: exit {code} after {minutes:.1f} min (CI={os.environ.get('CI', '')})",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
