"""Each stack on a host has its own tag in the names of its host objects (bridges,
VXLAN devices, nftables tables, container netns and cgroups), and a second stack
whose tag is live elsewhere is refused before it touches anything."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from appliance import supervisor
from appliance.settings import DEFAULT_DATA_DIR, Settings


def test_the_installed_node_keeps_plain_names_and_every_other_data_dir_gets_a_tag(tmp_path: Path) -> None:
    assert Settings(data_dir=DEFAULT_DATA_DIR).stack_tag == ""
    tags = {Settings(data_dir=tmp_path / f"s{i}").stack_tag for i in range(20)}
    assert len(tags) == 20 and all(len(t) == 4 and t.isalpha() and t.islower() for t in tags)
    assert Settings(data_dir=tmp_path / "s1").stack_tag == Settings(data_dir=tmp_path / "s1").stack_tag
    assert Settings(data_dir=tmp_path / "s1", stack_id="lab").host_prefix == "cairnlab"
    with pytest.raises(ValidationError, match="lower-case letters"):
        Settings(stack_id="Lab1")


def test_a_second_stack_with_a_live_stacks_tag_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "STACKS_DIR", tmp_path / "stacks")
    mine = Settings(data_dir=tmp_path / "one", stack_id="same")
    other = Settings(data_dir=tmp_path / "two", stack_id="same")
    assert supervisor.stack_conflict(other) is None  # nobody claimed it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "appliance.supervisor"])
    try:
        (tmp_path / "stacks").mkdir()
        (tmp_path / "stacks" / "same.json").write_text(
            json.dumps({"data_dir": str(mine.data_dir.resolve()), "pid": live.pid}))
        assert supervisor.stack_conflict(mine) is None  # its own claim
        deadline = time.monotonic() + 10  # the stand-in's /proc entry, however slow its start
        while (problem := supervisor.stack_conflict(other)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        cmdline = Path(f"/proc/{live.pid}/cmdline").read_bytes() if live.poll() is None else b"(exited)"
        assert problem, f"no conflict seen; the live stand-in {live.pid}: {cmdline!r}"
        assert problem and str(mine.data_dir.resolve()) in problem and "CAIRN_STACK_ID" in problem
    finally:
        live.kill()
        live.wait()
    assert supervisor.stack_conflict(other) is None  # a dead stack's claim does not count
