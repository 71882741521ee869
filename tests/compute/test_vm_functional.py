"""Real guests on a libvirt node: NBD disks, live migration, bad input."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute.cloudinit import CloudInitSeed, write_seed_iso
from compute.errors import ImageNotFound, InvalidPowerState
from compute.libvirt_driver import LibvirtDriver, choose_virt_type
from compute.libvirt_node import LibvirtNode
from compute.spec import DiskSpec, FileSource, KernelBoot, NbdSource, Placement, PowerState, QosClass, VirtType, VmSpec
from compute.testguest import MARKER
from tests.compute.conftest import wait_for_console

pytestmark = pytest.mark.functional


@pytest.fixture
def nbd_export(workdir: Path, prefix: str) -> Iterator[str]:
    """An ``nbdkit memory`` export on a unix socket whose first 16 bytes are 'N'; yields its URI."""
    sock = workdir / f"{prefix}-nbd-{time.monotonic_ns()}.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "--unix", str(sock), "memory", "16M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        assert sock.exists(), f"nbdkit did not start: {proc.stderr.read() if proc.stderr else b''!r}"
        uri = f"nbd+unix:///?socket={sock}"
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x4e 0 16", uri], check=True, capture_output=True)
        yield uri
    finally:
        proc.terminate()
        proc.wait(10)
        sock.unlink(missing_ok=True)


def read_export(uri: str, dest: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dest)], check=True, capture_output=True)
    return dest.read_bytes()


def test_vm_reads_the_bytes_its_nbd_disk_serves_and_its_writes_reach_the_export(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec], nbd_export: str, workdir: Path
) -> None:
    spec = dataclasses.replace(make_vm_spec("nbd", cmdline="cairn.disktest=1"),
                               disks=(DiskSpec(NbdSource(nbd_export)),))
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"VDA-WRITTEN")
        assert b"VDA: NNNNNNNNNNNNNNNN" in vm_driver.console_log(spec.name)
        vm_driver.stop(spec.name, timeout=0.5)  # flush: QEMU closes the export
        data = read_export(nbd_export, workdir / f"{spec.name}.img")
        assert data[1024 * 1024: 1024 * 1024 + 17] == b"CAIRN-GUEST-WROTE"
    finally:
        vm_driver.delete(spec.name)


def test_vm_disk_over_nbd_with_tls(vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec],
                                   nbd_pki: tuple[Path, Path], workdir: Path, prefix: str) -> None:
    """An ``nbds://`` disk: QEMU upgrades to TLS with the node's client certificate
    (libvirt's nbd_tls_x509_cert_dir) and the guest reads and writes cairn-nbd's TCP
    export, which serves nothing in plaintext."""
    from appliance.pki import nbd_server_tls

    pki, client = nbd_pki
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = workdir / f"{prefix}-tls-ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "storage.nbd.server", "--pool-dir", str(workdir / f"{prefix}-tls-pool"),
         "--create", "t:16MiB", "--listen", f"127.0.0.1:{port}", "--tls-dir", str(nbd_server_tls(pki, ["127.0.0.1"])),
         "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    opts = ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={client}",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=t,tls-creds=tls0"]
    spec = dataclasses.replace(make_vm_spec("nbdtls", cmdline="cairn.disktest=1"),
                               disks=(DiskSpec(NbdSource(f"nbds://127.0.0.1:{port}/t")),))
    try:
        for _ in range(500):
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert ready.exists(), proc.stderr.read() if proc.stderr else b""
        subprocess.run(["qemu-io", "-c", "write -P 0x4e 0 16", *opts], check=True, capture_output=True)
        vm_driver.spawn(spec)
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"VDA-WRITTEN")
        assert b"VDA: NNNNNNNNNNNNNNNN" in vm_driver.console_log(spec.name)
        vm_driver.stop(spec.name, timeout=0.5)
        out = subprocess.run(["qemu-io", "-c", "read -v 1M 17", *opts], check=True, capture_output=True, text=True)
        assert "CAIRN.GUEST.WROT" in out.stdout, out.stdout  # qemu-io -v: the hex dump's text column
    finally:
        vm_driver.delete(spec.name)
        proc.terminate()
        proc.wait(30)


def test_reboot_restarts_the_guest_and_the_serial_log_shows_a_second_boot(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("reboot")
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), MARKER.encode())
        vm_driver.reboot(spec.name)
        deadline = time.monotonic() + 60
        while vm_driver.console_log(spec.name).count(MARKER.encode()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm_driver.console_log(spec.name).count(MARKER.encode()) == 2
        assert vm_driver.power_state(spec.name) is PowerState.RUNNING
    finally:
        vm_driver.delete(spec.name)


def test_a_guest_with_the_balloon_driver_reports_its_used_memory_and_one_without_reports_none(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    """The domain's virtio balloon (statistics every 10 s): the tiny guest loads its driver
    and reports the memory it uses, less than it was given; a guest whose kernel refuses
    the driver reports nothing (libvirt leaves the figures out). Both have QEMU's resident
    set on the host."""
    talks = make_vm_spec("balloon", memory_mib=256)
    silent = make_vm_spec("noballoon", "module_blacklist=virtio_balloon", memory_mib=256)
    try:
        for spec in (talks, silent):
            vm_driver.spawn(spec)
        for spec in (talks, silent):
            wait_for_console(lambda: vm_driver.console_log(spec.name), b"HB 1 ")  # noqa: B023 (called at once)
        assert b"blacklisted" in vm_driver.console_log(silent.name)
        deadline = time.monotonic() + 60
        while (stats := vm_driver.stats())[talks.name].memory_used_bytes is None:
            assert time.monotonic() < deadline, "the guest with the balloon driver never reported its memory"
            time.sleep(1)
        used = stats[talks.name].memory_used_bytes
        assert used is not None and 4 << 20 < used < 256 << 20, used
        assert stats[silent.name].memory_used_bytes is None  # booted with it, had as long to report
        assert stats[talks.name].memory_bytes > 16 << 20 and stats[silent.name].memory_bytes > 16 << 20
    finally:
        for spec in (talks, silent):
            vm_driver.delete(spec.name)


def test_live_migration_between_two_nodes_keeps_the_guest_running(
    vm_driver: LibvirtDriver, libvirt_node_b: LibvirtNode, make_vm_spec: Callable[..., VmSpec], nbd_export: str
) -> None:
    dest = LibvirtDriver(libvirt_node_b.uri, virt_type="auto", migration_host="127.0.0.1")
    spec = dataclasses.replace(make_vm_spec("mig"), disks=(DiskSpec(NbdSource(nbd_export)),))
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"HB 2 ")
        before = max(int(n) for n in re.findall(rb"HB (\d+) ", vm_driver.console_log(spec.name)))
        result = vm_driver.migrate(spec.name, libvirt_node_b.uri)
        assert spec.name not in vm_driver.list_instances()
        assert dest.power_state(spec.name) is PowerState.RUNNING
        wait_for_console(lambda: dest.console_log(spec.name), f"HB {before + 3} ".encode(), timeout=30)
        log = dest.console_log(spec.name)
        assert log.count(MARKER.encode()) == 1, "the guest kept running: it did not boot again"
        assert result.duration_s < 30
        assert result.downtime_ms is not None and result.downtime_ms < 1000, result
    finally:
        dest.delete(spec.name)
        vm_driver.delete(spec.name)
        dest.close()


def test_missing_kernel_image_is_refused_before_anything_is_defined(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("noimg")
    spec = dataclasses.replace(spec, kernel_boot=KernelBoot("/nonexistent/vmlinuz", None))
    with pytest.raises(ImageNotFound, match=re.escape("/nonexistent/vmlinuz")):
        vm_driver.define(spec)
    assert spec.name not in vm_driver.list_instances()


def test_resuming_a_running_vm_is_an_invalid_power_state(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("resume")
    vm_driver.define(spec)
    try:
        with pytest.raises(InvalidPowerState, match="only a paused VM"):
            vm_driver.resume(spec.name)
    finally:
        vm_driver.delete(spec.name)


@pytest.mark.unit
def test_virt_type_auto_falls_back_to_tcg_on_nested_pvm(tmp_path: Path) -> None:
    pvm = tmp_path / "kvm_pvm"
    kvm = tmp_path / "kvm"
    kvm.touch()
    assert choose_virt_type("auto", pvm_marker=pvm, kvm_dev=kvm) is VirtType.KVM
    pvm.mkdir()
    assert choose_virt_type("auto", pvm_marker=pvm, kvm_dev=kvm) is VirtType.QEMU
    assert choose_virt_type("kvm", pvm_marker=pvm, kvm_dev=kvm) is VirtType.KVM
    assert choose_virt_type("auto", pvm_marker=tmp_path / "no", kvm_dev=tmp_path / "nokvm") is VirtType.QEMU
    with pytest.raises(ValueError, match="auto, kvm or qemu"):
        choose_virt_type("xen")


def test_serial_console_socket_reaches_a_shell_in_the_guest(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("console")
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"HB 1 ")
        endpoint = next(c for c in vm_driver.consoles(spec.name) if c.kind == "serial-unix")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(endpoint.path)
            s.settimeout(1.0)
            seen = b""
            deadline = time.monotonic() + 30
            while b"CONSOLE-42" not in seen and time.monotonic() < deadline:
                s.sendall(b"echo CONSOLE-$((6*7))\n")
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    pass
        assert b"CONSOLE-42" in seen, seen[-500:]
    finally:
        vm_driver.delete(spec.name)


def test_guaranteed_vm_boots_with_its_vcpu_pinned_to_the_placed_host_cpu(
    vm_driver: LibvirtDriver, libvirt_node: LibvirtNode, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("pinned", qos_class=QosClass.GUARANTEED, placement=Placement(host_cpus=(1,)))
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), MARKER.encode())
        out = subprocess.run(["virsh", "-c", libvirt_node.uri, "vcpupin", spec.name], capture_output=True,
                             text=True, check=True).stdout
        assert re.search(r"^\s*0\s+1\s*$", out, re.M), out
    finally:
        vm_driver.delete(spec.name)


def test_a_guest_that_powers_itself_off_is_observed_as_shutdown(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]
) -> None:
    spec = make_vm_spec("selfoff")
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"HB 1 ")
        endpoint = next(c for c in vm_driver.consoles(spec.name) if c.kind == "serial-unix")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(endpoint.path)
            deadline = time.monotonic() + 30
            while vm_driver.power_state(spec.name) is PowerState.RUNNING and time.monotonic() < deadline:
                try:
                    s.sendall(b"poweroff -f\n")
                except BrokenPipeError:  # QEMU exited between our check and the write: it powered off
                    pass
                time.sleep(0.5)
        wait_until = time.monotonic() + 10
        while vm_driver.power_state(spec.name) is not PowerState.SHUTDOWN and time.monotonic() < wait_until:
            time.sleep(0.1)
        assert vm_driver.power_state(spec.name) is PowerState.SHUTDOWN
    finally:
        vm_driver.delete(spec.name)


def test_cloud_init_seed_attached_as_a_disk_is_visible_to_the_guest_with_its_cidata_label(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec], workdir: Path
) -> None:
    iso = write_seed_iso(CloudInitSeed("i-1", "seeded", "#cloud-config\n{}\n"), str(workdir / "seed.iso"))
    spec = dataclasses.replace(make_vm_spec("seed", cmdline="cairn.peek=vda:32808:6"),
                               disks=(DiskSpec(FileSource(iso), readonly=True),))
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"PEEK:")
        assert b"PEEK: cidata" in vm_driver.console_log(spec.name)
    finally:
        vm_driver.delete(spec.name)


def test_vnc_console_endpoint_speaks_rfb(vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec]) -> None:
    spec = make_vm_spec("vnc", vnc=True)
    vm_driver.spawn(spec)
    try:
        endpoint = next(c for c in vm_driver.consoles(spec.name) if c.kind == "vnc-tcp")
        assert endpoint.host == "127.0.0.1"
        with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as s:
            assert s.recv(12).startswith(b"RFB 003.")
    finally:
        vm_driver.delete(spec.name)


def test_saved_memory_state_restores_the_same_running_guest(
    vm_driver: LibvirtDriver, make_vm_spec: Callable[..., VmSpec], workdir: Path
) -> None:
    spec = make_vm_spec("save")
    state = workdir / f"{spec.name}.state"
    snapshot = workdir / f"{spec.name}.mem"
    vm_driver.spawn(spec)
    try:
        wait_for_console(lambda: vm_driver.console_log(spec.name), b"HB 2 ")
        vm_driver.save_state(spec.name, str(state))
        assert vm_driver.power_state(spec.name) is PowerState.SHUTDOWN
        last = max(int(n) for n in re.findall(rb"HB (\d+) ", vm_driver.console_log(spec.name)))
        vm_driver.restore_state(spec.name, str(state))
        assert vm_driver.power_state(spec.name) is PowerState.RUNNING
        wait_for_console(lambda: vm_driver.console_log(spec.name), f"HB {last + 2} ".encode(), timeout=30)
        assert vm_driver.console_log(spec.name).count(MARKER.encode()) == 1, "resumed, not rebooted"
        # a memory snapshot keeps the guest running; restoring it goes back to that moment
        vm_driver.pause(spec.name)
        at = max(int(n) for n in re.findall(rb"HB (\d+) ", vm_driver.console_log(spec.name)))
        vm_driver.snapshot_memory(spec.name, str(snapshot))
        assert vm_driver.power_state(spec.name) is PowerState.PAUSED, "the snapshot keeps its power state"
        vm_driver.resume(spec.name)
        wait_for_console(lambda: vm_driver.console_log(spec.name), f"HB {at + 3} ".encode(), timeout=30)
        vm_driver.stop(spec.name, timeout=0)
        seen = len(vm_driver.console_log(spec.name))
        vm_driver.restore_state(spec.name, str(snapshot))
        assert vm_driver.power_state(spec.name) is PowerState.RUNNING
        wait_for_console(lambda: vm_driver.console_log(spec.name)[seen:], b"HB ", timeout=30)
        first = int(re.findall(rb"HB (\d+) ", vm_driver.console_log(spec.name)[seen:])[0])
        assert first == at + 1, f"resumed at HB {first}, the snapshot was taken after HB {at}"
    finally:
        vm_driver.delete(spec.name)
        state.unlink(missing_ok=True)
        snapshot.unlink(missing_ok=True)


def _cgroups_of(pid: int) -> dict[str, str]:
    """controller -> path, from /proc/<pid>/cgroup (cgroup v1 lines; co-mounted ones split)."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            out[controller] = path
    return out


def test_with_cgroups_on_each_guest_has_a_cgroup_of_its_own_removed_with_it(
    workdir: Path, make_vm_spec: Callable[..., VmSpec]
) -> None:
    """Issue 11 item 5: a node that owns its host (``LibvirtNode(cgroups=True)``; an
    installed node's system libvirtd does the same with Debian's qemu.conf) puts each
    guest's QEMU in a cgroup of its own per controller, ``/machine/qemu-ID-NAME…``,
    not in the cgroup of whoever started it, and removes it with the domain."""
    node = LibvirtNode(workdir / "nodes", "node-cg", cgroups=True)
    spec = make_vm_spec("cgroup")
    driver: LibvirtDriver | None = None
    try:
        node.start()
        driver = LibvirtDriver(node.uri, virt_type="auto")
        driver.spawn(spec)
        pid = int((node.dir / "run" / "qemu" / f"{spec.name}.pid").read_text())
        mine, its = _cgroups_of(os.getpid()), _cgroups_of(pid)
        own = re.compile(rf"/machine/qemu-\d+-{re.escape(spec.name)}\.libvirt-qemu(/emulator)?")
        dirs = {}
        for controller in ("cpu", "memory", "blkio"):  # cpuacct stays at / on a host that mounts it apart
            assert own.fullmatch(its[controller]), (controller, its)
            assert its[controller] != mine[controller]
            dirs[controller] = Path("/sys/fs/cgroup", controller, its[controller].lstrip("/"))
            assert str(pid) in (dirs[controller] / "cgroup.procs").read_text().split(), dirs[controller]
        # a cgroup of its own: no process but this QEMU's in it
        assert (dirs["memory"] / "cgroup.procs").read_text().split() == [str(pid)]
        assert (dirs["memory"] / "memory.limit_in_bytes").exists()
        wait_for_console(lambda: driver.console_log(spec.name) if driver else b"", MARKER.encode())
        driver.delete(spec.name)
        deadline = time.monotonic() + 10
        while any(d.exists() for d in dirs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [str(d) for d in dirs.values() if d.exists()] == [], "the deleted guest's cgroups are left"
    finally:
        if driver is not None:
            if spec.name in driver.list_instances():
                driver.delete(spec.name)
            driver.close()
        node.stop()
