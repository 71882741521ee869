"""Unix socket names are limited to 107 bytes; deep data directories get a stand-in."""

from __future__ import annotations

import socket
from pathlib import Path

from compute.oci_driver import SUN_PATH_MAX, socket_path


def test_short_paths_stay_and_long_ones_get_a_bindable_stand_in(tmp_path: Path) -> None:
    assert socket_path(tmp_path / "tty.sock") == tmp_path / "tty.sock"
    deep = tmp_path / ("d" * 120) / "tty.sock"
    short = socket_path(deep)
    assert len(str(short)) <= SUN_PATH_MAX and short == socket_path(deep)  # stable
    assert short != socket_path(tmp_path / ("e" * 120) / "tty.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(short))
    short.unlink()
