"""The real thing: build the ISO (once per session, from the build cache when its inputs
did not change), install a blank disk from it in QEMU (TCG) with the answer on a
CAIRN-ANS seed, boot the installed disk alone, and see the appliance answer
``cairn status`` from inside the guest; under SeaBIOS and OVMF, side by side.

The build cache is /var/cache/cairn-installer (CAIRN_INSTALLER_CACHE): a cold build
downloads Debian packages and takes minutes; a code change rebuilds one small layer."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pytest

from installer.build import Builder, BuildResult, check_hybrid
from installer.errors import AnswerError
from installer.media import BAKED_ANSWER, prepare_iso, read_iso_file
from tests.installer.vm import Vm, blank_disk, cdrom, fat_seed, iso_seed, virtio_disk

pytestmark = [pytest.mark.functional, pytest.mark.slow]
BUILDS: list[BuildResult] = []


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("iso") / "cairn.iso"
    BUILDS.append(Builder(progress=lambda msg: print(f"build-iso: {msg}", flush=True)).build(out))
    print(f"build-iso: {json.dumps(BUILDS[-1].to_json())}")
    yield out
    out.unlink(missing_ok=True)


def answer_for(firmware: str) -> str:
    password = subprocess.run(["openssl", "passwd", "-6", "-stdin"], input="cairn\n", capture_output=True,
                              text=True, check=True).stdout.strip()
    return f'''
hostname = "cairn-{firmware}"
root_password_hash = "{password}"
ntp = ["10.0.2.2"]
network = {{ mac = "52:54:00:c4:00:01" }}
disks.install = {{ serial = "CAIRN-DISK-*", size_min = "6GiB" }}
'''


@pytest.mark.timeout(1800)
def test_the_iso_is_hybrid_and_an_unchanged_rebuild_comes_from_the_cache(iso: Path, tmp_path: Path) -> None:
    check_hybrid(iso)
    files = subprocess.run(["osirrox", "-indev", str(iso), "-find", "/live", "-type", "f"], capture_output=True,
                           text=True).stdout
    for name in ("base.squashfs", "cairn.squashfs", "filesystem.module", "vmlinuz", "initrd.img"):
        assert f"/live/{name}'" in files, files
    again = Builder(progress=lambda msg: None).build(tmp_path / "again.iso")
    assert again.cached and again.keys == BUILDS[0].keys
    assert (tmp_path / "again.iso").stat().st_size == iso.stat().st_size


@pytest.mark.timeout(600)
def test_prepare_iso_bakes_the_answer_in_and_both_firmwares_still_boot_it(iso: Path, tmp_path: Path) -> None:
    answer = tmp_path / "answer.toml"
    answer.write_text("hostname = ")
    with pytest.raises(AnswerError, match="not valid TOML"):
        prepare_iso(answer, iso, tmp_path / "never.iso")
    assert not (tmp_path / "never.iso").exists()
    answer.write_text(answer_for("baked"))
    baked = tmp_path / "baked.iso"
    prepare_iso(answer, iso, baked)
    assert read_iso_file(baked, BAKED_ANSWER) == answer.read_bytes()
    check_hybrid(baked)
    for firmware in ("bios", "uefi"):  # GRUB still finds its ISO (kept volume date) and loads the kernel
        vm = Vm(f"baked-{firmware}", tmp_path, firmware=firmware, memory_mib=512, cpus=1)
        vm.start(vm.argv(*cdrom(baked, 2, boot=True)))
        try:
            vm.wait_for({"grub": "CAIRN-GRUB: loading"}, timeout=120)
        finally:
            vm.stop()


def install_and_boot(iso: Path, firmware: str, workdir: Path, started: list[Vm] | None = None) -> dict[str, Any]:
    """ISO + blank disk + seed → CAIRN-INSTALL: OK → power off; the disk alone → first
    boot OK and `cairn status` on serial. Returns the timings and the status. Each VM is
    also put in ``started``, for a caller that stops them all when another run failed."""
    started = [] if started is None else started
    workdir.mkdir()
    answer = answer_for(firmware)
    disk = blank_disk(workdir / "disk.qcow2")
    if firmware == "bios":  # the ISO on a CD, the answer on a FAT "USB stick"
        seed = fat_seed(workdir / "seed.img", answer)
        media = [*cdrom(iso, 2, boot=True), *virtio_disk(seed, "seed", "SEED", fmt="raw")]
    else:  # the hybrid ISO written to a "USB stick", the answer on an ISO 9660 CD
        media = [*virtio_disk(iso, "stick", "USB-STICK", fmt="raw", readonly=True, boot=True),
                 *cdrom(iso_seed(workdir / "seed.iso", answer), 2)]  # a lone IDE slave is not probed
    live = Vm(f"iso-{firmware}", workdir, firmware=firmware)
    started.append(live)
    live.start(live.argv(*media, *virtio_disk(disk, "d0", "CAIRN-DISK-0")))
    try:
        marks = live.wait_for({"grub": "CAIRN-GRUB: loading", "installer": "CAIRN-INSTALL: looking",
                               "installed": "CAIRN-INSTALL: OK"}, timeout=1200)
        marks["exit"] = live.wait_exit(120)  # it reboots; -no-reboot makes that QEMU's exit
    finally:
        live.stop()
    node = Vm(f"disk-{firmware}", workdir, firmware=firmware)
    started.append(node)
    node.start(node.argv(*virtio_disk(disk, "d0", "CAIRN-DISK-0")))
    try:
        boot = node.wait_for({"grub": "CAIRN-GRUB: booting", "firstboot": "CAIRN-FIRSTBOOT: OK",
                              "status": "CAIRN-STATUS: "}, timeout=1200)
        time.sleep(1)
        line = next(ln for ln in node.text().splitlines() if ln.startswith("CAIRN-STATUS: "))
    finally:
        node.stop()
    return {"iso": marks, "disk": boot, "status": json.loads(line.removeprefix("CAIRN-STATUS: "))}


def side_by_side(iso: Path, workdir: Path) -> dict[str, dict[str, Any]]:
    """Both firmwares at once; the first failure stops the other machine too."""
    vms: list[Vm] = []
    with ThreadPoolExecutor(2) as pool:
        runs = {pool.submit(install_and_boot, iso, fw, workdir / fw, vms): fw for fw in ("bios", "uefi")}
        try:
            return {runs[f]: f.result() for f in as_completed(runs)}
        except BaseException:
            for vm in list(vms):
                vm.stop()
            raise


@pytest.mark.timeout(1800)
def test_unattended_bios_install_then_the_node_answers_cairn_status(iso: Path, tmp_path: Path) -> None:
    """The suite's representative path (SeaBIOS: the ISO on a CD, the answer on a FAT
    stick). UEFI (the ISO written to a stick, the answer on a CD) runs side by side with
    it in ``bench/installer_bench.py``, which fails when either does."""
    result = install_and_boot(iso, "bios", tmp_path / "bios")
    print(f"bios: ISO {result['iso']}, installed disk {result['disk']}")
    check_status(result["status"], "bios")


def check_status(status: dict[str, Any], firmware: str) -> None:
    """What `cairn status` printed inside the installed guest."""
    assert status["node"] == f"cairn-{firmware}", status  # the API answering is this node's own
    assert {n["name"]: n["phase"] for n in status["nodes_detail"]} == {f"cairn-{firmware}": "Ready"}, status
    # `cairn status` lists the node's systemd units on an appliance
    assert {name: s["running"] for name, s in status["services"].items()} == {
        "redis": True, "storage": True, "api": True, "worker": True, "agent": True, "prometheus": True,
        "libvirt": True}, status
