"""First boot: the cluster command before the node's services start, exactly as an operator
types it, once; the report step refuses to call a node formed when forming failed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.settings import get_settings
from installer.answer import parse_answer
from installer.console import Reporter
from installer.firstboot import FORM_RESULT, FirstBoot, _shown, cluster_command
from installer.target import node_json

pytestmark = pytest.mark.unit
BASE = 'hostname = "n1"\nroot_password_hash = "$6$s$h"\nnetwork.mac = "52:54:00:00:00:01"\ndisks.install = {}\n'
JOIN = BASE + 'cluster = { mode = "join", address = "10.0.0.11:8443", token = "K10abc::tok.secret1234" }\n'


def test_first_boot_runs_exactly_the_cluster_commands_and_hides_the_token() -> None:
    base = 'hostname = "n1"\nroot_password_hash = "$6$s$h"\nnetwork.mac = "52:54:00:00:00:01"\ndisks.install = {}\n'
    assert cluster_command(parse_answer(base).nodes[0].answer) is None
    init = cluster_command(parse_answer(base + 'cluster.mode = "init"\n').nodes[0].answer)
    assert init is not None and init[1:] == ["cluster", "init"] and init[0].endswith("/cairn")
    join = cluster_command(parse_answer(base + 'cluster = { mode = "join", address = "10.0.0.11:8443", '
                                               'token = "K10abc::tok.secret1234" }\n').nodes[0].answer)
    assert join is not None and join[1:] == ["cluster", "join", "10.0.0.11:8443", "K10abc::tok.secret1234"]
    assert _shown(join) == "cairn cluster join 10.0.0.11:8443 <token>"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CAIRN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


class Runner:
    def __init__(self, code: int = 0, stderr: str = "") -> None:
        self.calls: list[list[str]] = []
        self.code, self.stderr = code, stderr

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, self.code, "", self.stderr)


def boot(tmp_path: Path, text: str, runner: Runner) -> tuple[FirstBoot, Path]:
    answer = parse_answer(text).nodes[0].answer
    (tmp_path / "node.json").write_text(node_json(answer, "/dev/vda", []))
    serial = tmp_path / "serial.log"
    return FirstBoot(Reporter("CAIRN-FIRSTBOOT", consoles=(serial,), echo=False), tmp_path / "node.json",
                     run=runner), serial


def test_forming_runs_the_join_once_and_records_it(tmp_path: Path, data_dir: Path) -> None:
    runner = Runner()
    fb, serial = boot(tmp_path, JOIN, runner)
    assert fb.form() == 0 and fb.form() == 0
    assert [c[1:] for c in runner.calls] == [["cluster", "join", "10.0.0.11:8443", "K10abc::tok.secret1234"]]
    assert json.loads((data_dir / FORM_RESULT).read_text())["ok"] is True
    assert "K10abc" not in serial.read_text()  # the token never reaches the console


def test_a_failed_join_is_reported_and_tried_again_next_boot(tmp_path: Path, data_dir: Path) -> None:
    runner = Runner(1, "the token has expired")
    fb, serial = boot(tmp_path, JOIN, runner)
    assert fb.form() == 1
    assert "CAIRN-FIRSTBOOT: FAIL `cairn cluster join 10.0.0.11:8443 <token>` failed: the token has expired" \
        in serial.read_text()
    assert fb.run() == 1  # the report step says so rather than waiting for a node that will not form
    assert "FAIL forming the cluster failed: `cairn cluster join" in serial.read_text()
    assert not (data_dir / "firstboot.done").exists()
    joins = [c for c in runner.calls if c[1:3] == ["cluster", "join"]]
    assert fb.form() == 1 and len([c for c in runner.calls if c[1:3] == ["cluster", "join"]]) == len(joins) + 1
