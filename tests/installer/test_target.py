"""Golden tests of the installed node's files and the ISO's boot menu."""

from __future__ import annotations

import pytest

from installer import target
from installer.answer import Network, parse_answer
from installer.media import iso_grub_cfg
from tests.installer.conftest import golden

pytestmark = pytest.mark.unit

ROOT = "0b6f3c55-2f7e-4d0e-9b7e-6a2f2a0c7c11"
ANSWER = parse_answer('''
hostname = "node1.lab.example"
root_password_hash = "$6$salt$hash"
ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGsRnY9D6xUFYvNqsz+ET8C1r8eqUqXAvDfxNQk7eUtE admin"]
ntp = ["ntp1.example.com", "10.0.0.1"]
network = { mac = "52:54:00:00:00:01", mode = "static", address = "10.0.0.11/24", gateway = "10.0.0.1", mtu = 9000 }
disks.install = {}
''').nodes[0].answer


@pytest.mark.parametrize(("name", "network"), [
    ("dhcp", {"mac": "52:54:00:00:00:01"}),
    ("static-vlan", {"mac": "52:54:00:00:00:01", "vlan": 42, "mode": "static", "address": "10.0.42.5/24",
                     "gateway": "10.0.42.1", "dns": ["10.0.42.1", "2001:db8::53"], "search": ["lab.example"]}),
    ("bond-lacp-vlan-mtu", {"bond": {"macs": ["52:54:00:00:00:01", "52:54:00:00:00:02"], "mode": "802.3ad"},
                            "vlan": 100, "mtu": 9000, "mode": "static", "address": "2001:db8::11/64"}),
    ("bond-dhcp", {"bond": {"macs": ["52:54:00:00:00:01", "52:54:00:00:00:02"]}}),
])
def test_networkd_files_match_nics_by_permanent_mac(name: str, network: dict[str, object]) -> None:
    files = target.networkd_files(Network.model_validate(network))
    golden(f"networkd-{name}.txt", "".join(f"### {n}\n{t}" for n, t in files.items()))
    matched = [line for text in files.values() for line in text.splitlines() if line.startswith("[Match]")]
    assert "Name=eth0" not in "".join(files.values())  # never by a kernel name
    assert matched


def test_node_files_are_the_golden_ones() -> None:
    golden("fstab", target.fstab(ROOT, "ABCD-1234"))
    golden("disk-grub.cfg", target.disk_grub_cfg(ROOT))
    golden("efi-early.cfg", target.efi_early_cfg(ROOT))
    golden("hosts", target.hosts_file(ANSWER))
    golden("cairn.env", target.cairn_env(ANSWER, ["/dev/disk/by-id/ata-ST8000_ZA10K3QX"]))
    golden("timesyncd.conf", target.timesyncd_conf(ANSWER) or "")
    golden("iso-grub.cfg", iso_grub_cfg())
    assert target.hostname_file(ANSWER) == "node1\n"


def test_only_roots_password_changes_in_shadow() -> None:
    shadow = "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    assert target.shadow_with_root_hash(shadow, "$6$s$h") == \
        "root:$6$s$h:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def test_node_json_round_trips_the_answer_for_first_boot() -> None:
    import json

    from installer.answer import NodeAnswer

    doc = json.loads(target.node_json(ANSWER, "/dev/disk/by-id/x", []))
    assert NodeAnswer.model_validate(doc["answer"]) == ANSWER
