"""The README's test command ends here: the whole suite (lint gates are tests too).

``./bootstrap.sh test [pytest args]``. In CI (CI=true) a skipped test fails the run
(see tests/conftest.py); exit code 5 (no tests collected) is a failure as well."""

from __future__ import annotations

import os
import sys
import time

import pytest


def main() -> int:
    args = sys.argv[1:] or ["tests"]
    started = time.monotonic()
    code = pytest.main(["--durations=15", "-o", "console_output_style=count", *args])
    minutes = (time.monotonic() - started) / 60
    print(f"cairn test suite: exit {int(code)} after {minutes:.1f} min (CI={os.environ.get('CI', '')})",
          file=sys.stderr)
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("no tests were collected: that is a failure")
        return 1
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
