"""``cairn-installer validate`` / ``device-info`` as a person or a script uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from installer.cli import app
from installer.hardware import Hardware
from tests.installer.conftest import FIXTURES

pytestmark = pytest.mark.unit
runner = CliRunner()
ANSWER = '''
hostname = "node1"
root_password_hash = "$6$salt$0123456789abcdef"
network = { mac = "0c:42:a1:7e:55:10" }
disks.install = { model = "SAMSUNG*" }
disks.data = [{ rotational = true, count = 4 }]
'''


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "answer.toml"
    path.write_text(text)
    return path


def test_validate_accepts_a_good_file_and_a_machine_it_fits(tmp_path: Path) -> None:
    r = runner.invoke(app, ["validate", str(write(tmp_path, ANSWER))])
    assert r.exit_code == 0, r.output
    assert "valid (1 node: node1)" in r.output
    r = runner.invoke(app, ["validate", str(write(tmp_path, ANSWER)), "--hardware",
                            str(FIXTURES / "server-r640.json")])
    assert r.exit_code == 0, r.output
    assert '"install_disk": "/dev/nvme0n1"' in r.output


@pytest.mark.parametrize(("text", "hardware", "reason"), [
    (ANSWER.replace('"node1"', '"node_1"'), False, "hostname: 'node_1' is not a host name"),
    (ANSWER.replace("count = 4", "count = 5"), True, "disks.data[0] (rotational=True) must match 5 disks, matches 4"),
    (ANSWER.replace('model = "SAMSUNG*"', 'model = "INTEL*"'), True, "matches 2 disks (/dev/sda, /dev/sdb)"),
    (ANSWER.replace("0c:42:a1:7e:55:10", "0c:42:a1:7e:55:77"), True, "network.mac: no NIC has MAC 0c:42:a1:7e:55:77"),
    (ANSWER + 'cluster = { mode = "join", address = "10.0.0.1", token = "x" }\n', False,
     "cluster.token: not a join token"),
])
def test_validate_fails_naming_the_key(tmp_path: Path, text: str, hardware: bool, reason: str) -> None:
    argv = ["validate", str(write(tmp_path, text))]
    if hardware:
        argv += ["--hardware", str(FIXTURES / "server-r640.json")]
    r = runner.invoke(app, argv)
    assert r.exit_code == 1
    assert reason in r.output


def test_validate_says_what_is_wrong_with_a_hardware_file(tmp_path: Path) -> None:
    bad = tmp_path / "hw.json"
    bad.write_text("{not json")
    r = runner.invoke(app, ["validate", str(write(tmp_path, ANSWER)), "--hardware", str(bad)])
    assert r.exit_code == 1 and "not a device-info JSON file" in r.output


def test_device_info_prints_this_machines_json_that_validate_reads_back() -> None:
    r = runner.invoke(app, ["device-info"])
    assert r.exit_code == 0, r.output
    hw = Hardware.model_validate(json.loads(r.stdout))
    assert hw.version == 1 and hw.nics, "this machine has a NIC"
