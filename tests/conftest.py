"""Suite-wide pytest configuration.

In CI (``CI=true``) a skipped test fails the run: a test that needs a missing
service must fail with the reason, never skip silently.
"""

from __future__ import annotations

import os

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    terminalreporter.write_line(f"skipped tests: {skipped}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


from tests.lab_cluster import lab_cluster  # noqa: E402,F401  (the session's lab cluster, on demand)
