"""Fitting answers to machines, golden-tested against device-info fixtures.

``server-r640.json`` is the shape of a typical 1U server (NVMe boot SSD, two SATA SSDs,
one of them used, four 8 TB disks, the USB stick the ISO runs from, four NICs);
``qemu-live.json`` was recorded by the live installer in the QEMU machine the ISO test
uses (``/var/log/cairn-installer/device-info.json`` on the installed disk)."""

from __future__ import annotations

import json

import pytest

from installer.answer import parse_answer
from installer.errors import HardwareMismatch
from installer.matching import plan_install
from tests.installer.conftest import TOKEN, golden, hardware

pytestmark = pytest.mark.unit

HASH = "$6$rounds=4096$salt$0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"
SERVER = f'''
hostname = "node1"
root_password_hash = "{HASH}"
network = {{ mac = "0c:42:a1:7e:55:10", mode = "static", address = "10.0.0.11/24", gateway = "10.0.0.1" }}
[disks]
install = {{ model = "SAMSUNG*" }}
data = [{{ model = "ST8000*", rotational = true, count = 4 }}]
'''


def mismatch(text: str, machine: str = "server-r640") -> str:
    with pytest.raises(HardwareMismatch) as err:
        plan_install(parse_answer(text), hardware(machine))
    return err.value.detail + "\n"


def test_the_server_answer_fits_and_its_plan_is_the_golden_one() -> None:
    plan = plan_install(parse_answer(SERVER), hardware("server-r640"))
    assert plan.install_disk.path == "/dev/nvme0n1"
    assert [d.name for d in plan.data_disks] == ["sdc", "sdd", "sde", "sdf"]
    assert plan.wipe == []
    golden("plan-server.json", json.dumps(plan.summary(), indent=1) + "\n")


def test_a_filter_matching_no_disk_lists_every_disk_seen() -> None:
    golden("no-match.txt", mismatch(SERVER.replace('model = "SAMSUNG*"', 'size_min = "20TB"')))


def test_a_filter_matching_two_disks_is_an_error_not_a_guess() -> None:
    text = mismatch(SERVER.replace('model = "SAMSUNG*"', 'model = "intel ssd*", rotational = false, wipe = true'))
    assert "matches 2 disks (/dev/sda, /dev/sdb); it must match exactly one" in text
    golden("two-matches.txt", text)


def test_the_boot_medium_and_the_answer_volume_are_never_candidates() -> None:
    text = mismatch(SERVER.replace('model = "SAMSUNG*"', 'size_max = "20GB"'))
    assert "/dev/sdg: 14.6 GiB" in text and "[not a candidate: mounted at /run/live/medium]" in text
    assert "matches no disk" in text


def test_a_used_disk_needs_wipe_true() -> None:
    text = mismatch(SERVER.replace('model = "SAMSUNG*"', 'serial = "PHYF812300CD*"'))
    assert text.strip().endswith("disks.install: /dev/sdb is not blank (gpt, ext4 on sdb1, swap on sdb2); "
                                 "set disks.install.wipe = true to erase it")
    plan = plan_install(parse_answer(SERVER.replace('model = "SAMSUNG*"', 'serial = "PHYF812300CD*", wipe = true')),
                        hardware("server-r640"))
    assert [d.path for d in plan.wipe] == ["/dev/sdb"]


def test_a_data_filter_must_match_its_count() -> None:
    text = mismatch(SERVER.replace("count = 4", "count = 3"))
    assert "disks.data[0] (model='ST8000*', rotational=True) must match 3 disks, matches 4 " in text
    assert "/dev/nvme0n1: 447.1 GiB, model 'SAMSUNG MZ1LB480HAJQ-00007'" in text
    assert "[not a candidate: the install disk]" in text


def test_a_missing_nic_is_named_with_the_nics_seen() -> None:
    golden("missing-nic.txt", mismatch(SERVER.replace("0c:42:a1:7e:55:10", "0c:42:a1:7e:55:99")))


def test_every_mismatch_is_reported_at_once() -> None:
    text = mismatch(SERVER.replace("0c:42:a1:7e:55:10", "0c:42:a1:7e:55:99").replace('model = "SAMSUNG*"',
                                                                                       'size_min = "20TB"'))
    assert text.count("\n  - ") == 2


MULTI = f'''
root_password_hash = "{HASH}"
disks.install = {{ model = "SAMSUNG*" }}
[[node]]
match.serial = "7XK2QH3"
hostname = "node1"
network.mac = "0c:42:a1:7e:55:10"
cluster = {{ mode = "init" }}
[[node]]
match.mac = "52:54:00:c4:00:02"
hostname = "node2"
network.mac = "52:54:00:c4:00:02"
cluster = {{ mode = "join", address = "10.0.0.11", token = "{TOKEN}" }}
'''


def test_a_node_is_chosen_by_smbios_serial_or_mac() -> None:
    plan = plan_install(parse_answer(MULTI), hardware("server-r640"))
    assert plan.entry.index == 0 and plan.answer.hostname == "node1"
    qemu = plan_install(parse_answer(MULTI.replace("52:54:00:c4:00:02", "52:54:00:c4:00:01")
                                     .replace('model = "SAMSUNG*"', 'size_min = "4GiB"')), hardware("qemu-live"))
    assert qemu.entry.index == 1 and qemu.answer.hostname == "node2"
    golden("plan-qemu.json", json.dumps(qemu.summary(), indent=1) + "\n")


def test_the_cairn_ans_volume_is_never_a_candidate() -> None:
    plan = plan_install(parse_answer(SERVER.replace('{ model = "SAMSUNG*" }', "{}").replace(
        "0c:42:a1:7e:55:10", "52:54:00:c4:00:01").split("data =")[0]), hardware("qemu-live"))
    assert plan.install_disk.path == "/dev/vda"  # the 8 MiB answer stick /dev/vdb is not a second match


def test_a_machine_no_node_matches_is_told_what_it_has() -> None:
    golden("no-node.txt", mismatch(MULTI.replace("7XK2QH3", "OTHER")))
