"""First boot: the node starts with exactly the command an operator types (``cairn up``,
``cairn cluster init``, ``cairn cluster join``), a join is tried again while the member is
away but never after a refusal, the token never reaches a console, and only success
marks the first boot done. (The real commands run in tests/installer/test_iso.py and
bench/installer_bench.py --cluster, inside installed QEMU nodes.)"""

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
from installer.firstboot import FirstBoot, node_command, shown
from installer.target import node_json
from tests.installer.conftest import TOKEN

pytestmark = pytest.mark.unit
BASE = 'hostname = "n1"\nroot_password_hash = "$6$s$h"\nnetwork.mac = "52:54:00:00:00:01"\ndisks.install = {}\n'
STATIC = BASE.replace('network.mac = "52:54:00:00:00:01"', 'network = { mac = "52:54:00:00:00:01", mode = "static", '
                      'address = "10.0.0.12/24" }')
JOIN = STATIC + f'cluster = {{ mode = "join", address = "10.0.0.11", token = "{TOKEN}" }}\n'
DISK = "/dev/disk/by-id/virtio-CAIRN-DATA-1"


def answer(text: str) -> Any:
    return parse_answer(text).nodes[0].answer


def test_the_commands_are_the_operators_own() -> None:
    up = node_command(answer(BASE), [], formed=False, timeout=600)
    assert up[0].endswith("/cairn") and up[1:] == ["up", "--output", "json", "--timeout", "600"]
    init = node_command(answer(STATIC + 'cluster.mode = "init"\n'), [DISK], formed=False, timeout=600)
    assert init[1:] == ["cluster", "init", "--address", "10.0.0.12", "--osd", DISK, "--output", "json",
                        "--timeout", "600"]
    assert shown(init) == f"cairn cluster init --address 10.0.0.12 --osd {DISK}"
    dhcp_init = node_command(answer(BASE + 'cluster.mode = "init"\n'), [], formed=False, timeout=600)
    assert dhcp_init[1:4] == ["cluster", "init", "--output"]  # the address of the default route's NIC
    join = node_command(answer(JOIN), [], formed=False, timeout=600)
    assert join[1:] == ["cluster", "join", "--address", "10.0.0.12", "--output", "json", "--timeout", "600",
                        "10.0.0.11", TOKEN]
    assert shown(join) == "cairn cluster join --address 10.0.0.12 10.0.0.11 <token>"
    slow = node_command(answer(STATIC + 'cluster = { mode = "init", timing = "relaxed" }\n'), [], formed=False,
                        timeout=600)
    assert slow[1:] == ["cluster", "init", "--address", "10.0.0.12", "--timing", "relaxed", "--output", "json",
                        "--timeout", "600"]
    # a node that already inited or joined (an earlier first boot failed later) only starts
    assert node_command(answer(JOIN), [], formed=True, timeout=600)[1] == "up"


def test_the_cairn_cli_takes_these_options() -> None:
    """The options first boot passes exist, spelled so, on the real commands."""
    import typer

    from appliance.cli.main import app

    root = typer.main.get_command(app)
    for words, options in ((["up"], ["--output", "--timeout"]),
                           (["cluster", "init"], ["--address", "--osd", "--timing", "--output", "--timeout"]),
                           (["cluster", "join"], ["--address", "--osd", "--output", "--timeout", "member", "token"])):
        command = root
        for word in words:
            command = command.commands[word]  # type: ignore[attr-defined]
        names = {name for p in command.params for name in [*p.opts, p.name or ""]}
        assert set(options) <= names, (words, names)
        arguments = [p.name for p in command.params if type(p).__name__.endswith("Argument")]
        assert arguments == [o for o in options if not o.startswith("--")], arguments


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CAIRN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path / "data"
    get_settings.cache_clear()


class Node:
    """The commands' results, in order; `cairn cluster join` succeeding makes the node formed."""

    def __init__(self, *results: tuple[int, str]) -> None:
        self.results = list(results)
        self.calls: list[list[str]] = []
        self.formed = False

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        if argv[1] == "status" or argv[1:3] == ["cluster", "status"]:
            return subprocess.CompletedProcess(argv, 0, json.dumps({"asked": argv[1:3]}), "")
        code, stderr = self.results.pop(0)
        if code == 0 and argv[1] == "cluster":
            self.formed = True
        return subprocess.CompletedProcess(argv, code, "{}", stderr)


def boot(tmp_path: Path, text: str, node: Node, timeout: float = 3600) -> tuple[FirstBoot, Path, list[float]]:
    a = answer(text)
    (tmp_path / "node.json").write_text(node_json(a, "/dev/vda", [DISK]))
    serial = tmp_path / "serial.log"
    slept: list[float] = []
    fb = FirstBoot(Reporter("CAIRN-FIRSTBOOT", consoles=(serial,), echo=False), tmp_path / "node.json", run=node,
                   timeout=timeout, retry_every=5, sleep=slept.append, formed=lambda: node.formed,
                   diagnostics=lambda: ["cairn-api.service: activating", "  boom"])
    return fb, serial, slept


def test_a_join_is_tried_again_while_the_member_is_away_then_reported(tmp_path: Path, data_dir: Path) -> None:
    node = Node((1, "error: cannot reach the member at 10.0.0.11:8443: connection refused"),
                (1, "error: 10.0.0.11 refused the join (503): the database is failing over"), (0, ""))
    fb, serial, slept = boot(tmp_path, JOIN, node)
    assert fb.run() == 0
    assert [c[1:3] for c in node.calls] == [["cluster", "join"]] * 3 + [["status", "--output"], ["cluster", "status"]]
    assert slept == [5, 5]
    log = serial.read_text()
    assert "cannot reach the member at 10.0.0.11:8443: connection refused; trying again in 5 s" in log
    assert "running `cairn cluster join --address 10.0.0.12 --osd " + DISK + " 10.0.0.11 <token>` (try 3)" in log
    assert 'CAIRN-FIRSTBOOT: OK\nCAIRN-STATUS: {"asked":["status","--output"]}\n' \
           'CAIRN-CLUSTER: {"asked":["cluster","status"]}\n' in log
    assert TOKEN not in log and TOKEN.split(".")[3] not in log  # the token never reaches a console
    assert (data_dir / "firstboot.done").exists()


@pytest.mark.parametrize("refusal", [
    "error: 10.0.0.11 refused the join (403): the join token expired at 2026-12-06T10:00:00Z: create a new one",
    "error: the CA of 10.0.0.11 (sha256 ab) is not the one the token names (5e5e): refusing to join",
])
def test_a_refused_join_fails_at_once_and_first_boot_runs_again_next_boot(
        tmp_path: Path, data_dir: Path, refusal: str) -> None:
    node = Node((1, refusal))
    fb, serial, slept = boot(tmp_path, JOIN, node)
    assert fb.run() == 1
    assert slept == [] and len(node.calls) == 1
    log = serial.read_text()
    assert "CAIRN-FIRSTBOOT: FAIL `cairn cluster join --address 10.0.0.12 --osd " + DISK + \
           f" 10.0.0.11 <token>` failed: {refusal}" in log
    assert "CAIRN-FIRSTBOOT:   cairn-api.service: activating\nCAIRN-FIRSTBOOT:     boom" in log
    assert not (data_dir / "firstboot.done").exists()  # the unit's condition: it runs again at the next boot


def test_a_join_that_never_gets_through_gives_up_at_the_deadline(tmp_path: Path, data_dir: Path) -> None:
    node = Node(*[(1, "error: cannot reach the member at 10.0.0.11:8443: timed out")] * 3)
    fb, serial, _slept = boot(tmp_path, JOIN, node, timeout=0.001)
    assert fb.run() == 1 and len(node.calls) == 1
    assert "FAIL `cairn cluster join --address 10.0.0.12 --osd" in serial.read_text()


def test_a_node_formed_by_an_earlier_boot_only_starts(tmp_path: Path, data_dir: Path) -> None:
    node = Node((0, ""))
    node.formed = True
    fb, _serial, _ = boot(tmp_path, JOIN, node)
    assert fb.run() == 0
    assert node.calls[0][1:3] == ["up", "--output"]


def test_an_init_or_up_that_fails_is_not_tried_again_in_the_same_boot(tmp_path: Path, data_dir: Path) -> None:
    node = Node((1, "the appliance did not become Ready within 600 s"))
    fb, serial, slept = boot(tmp_path, STATIC + 'cluster.mode = "init"\n', node)
    assert fb.run() == 1 and slept == [] and len(node.calls) == 1
    assert "FAIL `cairn cluster init --address 10.0.0.12 --osd " + DISK + "` failed: the appliance did not" \
        in serial.read_text()


class SlowStatus(Node):
    """A node that joined a busy cluster: its first `cairn status` outlasts the 120 s read."""

    def __init__(self, *results: tuple[int, str], slow: int = 1) -> None:
        super().__init__(*results)
        self.slow = slow

    def __call__(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        if argv[1] == "status" and self.slow:
            self.slow -= 1
            self.calls.append(argv)
            raise subprocess.TimeoutExpired(argv, kw["timeout"])
        return super().__call__(argv, **kw)


def test_a_status_that_does_not_answer_yet_is_asked_again_until_the_deadline(tmp_path: Path,
                                                                              data_dir: Path) -> None:
    node = SlowStatus((0, ""))
    fb, serial, slept = boot(tmp_path, JOIN, node)
    assert fb.run() == 0 and slept == [5]
    assert [c[1] for c in node.calls] == ["cluster", "status", "status", "cluster"]
    log = serial.read_text()
    assert "`cairn status` did not answer within 120 s; trying again in 5 s" in log and "CAIRN-FIRSTBOOT: OK" in log
    never = SlowStatus((0, ""), slow=99)
    fb, serial, _ = boot(tmp_path, JOIN, never, timeout=0.001)
    assert fb.run() == 1 and "FAIL `cairn status` did not answer within 120 s" in serial.read_text()
