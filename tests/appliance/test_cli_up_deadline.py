"""`cairn up` / `cluster join` on a cluster node keep their --timeout also when a database
write hangs instead of failing (a commit waiting for a synchronous standby that does not
stream): the installer bench saw `cairn cluster join --timeout 600` never return."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.cli import local


def test_a_hanging_attempt_is_given_up_at_the_deadline_and_a_failing_one_raises_its_error() -> None:
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not return"):
        local._bounded(release.wait, 0.5)
    assert time.monotonic() - t0 < 3
    release.set()
    with pytest.raises(KeyError):
        local._bounded(lambda: {}["missing"], 5)


def test_up_on_a_cluster_node_exits_at_its_timeout_when_the_database_write_hangs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hang = threading.Event()
    monkeypatch.setattr(local, "ensure_cli_token", lambda settings: hang.wait())
    monkeypatch.setattr(local, "_running", lambda settings, systemd: True)

    class Settings:
        data_dir = log_dir = run_dir = tmp_path

    t0 = time.monotonic()
    with pytest.raises(SystemExit, match=r"did not answer within 2 s .*did not return"):
        local._up_cluster_node(Settings(), 2, True, _never_called, False)  # type: ignore[arg-type]
    hang.set()
    assert time.monotonic() - t0 < 6


def _never_called(*_: Any) -> None:
    raise AssertionError("the node runs already: nothing to start")
