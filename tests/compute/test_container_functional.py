"""Real crun containers: networking with a VM, QoS cgroup limits, volumes, shared layers, bad input."""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from compute.container_router import ContainerRouter
from compute.errors import ImageNotFound, InstanceExists, InstanceNotFound, InvalidSpec, NotSupported
from compute.fake import fake_container_driver
from compute.libvirt_driver import LibvirtDriver
from compute.oci_driver import OciDriver
from compute.spec import (
    ContainerNic,
    ContainerSpec,
    DeviceIoLimit,
    NicSpec,
    PowerState,
    QosClass,
    VmSpec,
    VolumeMount,
)
from compute.testguest import TestGuest
from tests.compute.conftest import CONTAINER_MARKER, wait_for_console

pytestmark = pytest.mark.functional
CGROUP_V1 = Path("/sys/fs/cgroup")


def test_vm_and_container_on_one_bridge_ping_each_other(
    vm_driver: LibvirtDriver, oci_driver: OciDriver, bridge: str, prefix: str,
    make_vm_spec: Callable[..., VmSpec], make_container_spec: Callable[..., ContainerSpec],
) -> None:
    net = f"10.77.{secrets.randbelow(200) + 20}"
    tag = secrets.token_hex(1)
    ct = make_container_spec(
        "ping-ct",
        nics=(ContainerNic(mac=f"52:54:00:cc:00:{tag}", bridge=bridge, host_dev=f"{prefix}v{tag}",
                           address=f"{net}.3/24"),),
    )
    vm = make_vm_spec("ping-vm", cmdline=f"cairn.ip={net}.2/24 cairn.ping={net}.3",
                      nics=(NicSpec(mac=f"52:54:00:aa:00:{tag}", bridge=bridge, tap=f"{prefix}t{tag}"),))
    oci_driver.spawn(ct)
    try:
        vm_driver.spawn(vm)
        try:
            wait_for_console(lambda: vm_driver.console_log(vm.name), b"PING-", timeout=90)
            assert f"PING-OK {net}.3".encode() in vm_driver.console_log(vm.name)
            r = oci_driver.exec(ct.name, ["ping", "-c", "1", "-W", "3", f"{net}.2"])
            assert r.returncode == 0, r.stdout + r.stderr
            r = oci_driver.exec(ct.name, ["cat", "/sys/class/net/eth0/address"])
            assert r.stdout.strip() == f"52:54:00:cc:00:{tag}".encode()
        finally:
            vm_driver.delete(vm.name)
    finally:
        oci_driver.delete(ct.name)
    assert not Path(f"/sys/class/net/{prefix}v{tag}").exists(), "the veth is removed with the container"


def test_guaranteed_container_gets_a_cpu_quota_and_a_memory_limit(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("qos", vcpus=0.5, memory_mib=48, qos_class=QosClass.GUARANTEED)
    oci_driver.spawn(spec)
    try:
        wait_for_console(lambda: oci_driver.console_log(spec.name), CONTAINER_MARKER)
        cg = f"cairn/{spec.name}"
        assert (CGROUP_V1 / "cpu" / cg / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (CGROUP_V1 / "cpu" / cg / "cpu.shares").read_text().strip() == "512"
        assert (CGROUP_V1 / "memory" / cg / "memory.limit_in_bytes").read_text().strip() == str(48 << 20)
    finally:
        oci_driver.delete(spec.name)


def test_best_effort_container_has_minimal_cpu_shares_and_no_quota(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("be")
    oci_driver.spawn(spec)
    try:
        cg = CGROUP_V1 / "cpu" / "cairn" / spec.name
        assert (cg / "cpu.shares").read_text().strip() == "2"
        assert (cg / "cpu.cfs_quota_us").read_text().strip() == "-1"
    finally:
        oci_driver.delete(spec.name)


def test_io_limits_become_blkio_throttles(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    dev = next(f"/dev/{d}" for d in sorted(os.listdir("/sys/block")) if os.path.exists(f"/dev/{d}"))
    st = os.stat(dev)
    spec = make_container_spec("io", io_limits=(DeviceIoLimit(dev, read_bps=1048576, write_iops=100),))
    oci_driver.spawn(spec)
    try:
        cg = CGROUP_V1 / "blkio" / "cairn" / spec.name
        mm = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        assert f"{mm} 1048576" in (cg / "blkio.throttle.read_bps_device").read_text()
        assert f"{mm} 100" in (cg / "blkio.throttle.write_iops_device").read_text()
    finally:
        oci_driver.delete(spec.name)


def test_volumes_are_bind_mounted_read_write_and_read_only(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec], tmp_path: Path
) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "hello").write_text("from-host")
    spec = make_container_spec("vol", volumes=(VolumeMount(str(rw), "/data"), VolumeMount(str(ro), "/conf", True)))
    oci_driver.spawn(spec)
    try:
        assert oci_driver.exec(spec.name, ["sh", "-c", "echo from-ct > /data/out"]).returncode == 0
        assert (rw / "out").read_text() == "from-ct\n"
        assert oci_driver.exec(spec.name, ["cat", "/conf/hello"]).stdout == b"from-host"
        assert oci_driver.exec(spec.name, ["sh", "-c", "echo x > /conf/nope"]).returncode != 0
    finally:
        oci_driver.delete(spec.name)


def test_two_containers_share_the_image_layers_but_not_their_writes(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    a, b = make_container_spec("lay-a"), make_container_spec("lay-b")
    oci_driver.spawn(a)
    oci_driver.spawn(b)
    try:
        assert oci_driver.exec(a.name, ["sh", "-c", "echo only-a > /root/f"]).returncode == 0
        assert oci_driver.exec(b.name, ["cat", "/root/f"]).returncode != 0
        layers = [p for p in (oci_driver.images.root / "layers").iterdir() if not p.name.startswith(".")]
        assert len(layers) == 1, "the busybox layer is unpacked once"
    finally:
        oci_driver.delete(a.name)
        oci_driver.delete(b.name)


def test_container_from_a_local_rootfs_directory_runs(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec], guest: TestGuest
) -> None:
    layer = oci_driver.images.resolve(guest.oci_archive).layers[0]
    spec = make_container_spec("rootfs", image=str(layer), command=("/bin/echo", "FROM-ROOTFS"))
    oci_driver.spawn(spec)
    try:
        wait_for_console(lambda: oci_driver.console_log(spec.name), b"FROM-ROOTFS", timeout=10)
    finally:
        oci_driver.delete(spec.name)
    assert not (layer / "root" / "f").exists()


def test_missing_image_raises_image_not_found_and_defines_nothing(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("noimg", image="/nonexistent/image.tar")
    with pytest.raises(ImageNotFound, match=re.escape("/nonexistent/image.tar")):
        oci_driver.define(spec)
    assert spec.name not in oci_driver.list_instances()


def test_missing_volume_source_is_refused(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("novol", volumes=(VolumeMount("/nonexistent/vol", "/data"),))
    with pytest.raises(InvalidSpec, match=re.escape("/nonexistent/vol")):
        oci_driver.define(spec)


def test_tty_container_is_an_interactive_shell_through_its_console_socket(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("tty", command=("/bin/sh",), tty=True)
    oci_driver.spawn(spec)
    try:
        endpoint = next(c for c in oci_driver.consoles(spec.name) if c.kind == "serial-unix")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(endpoint.path)
            s.settimeout(0.5)
            seen = b""
            deadline = time.monotonic() + 15
            while b"TTY-42" not in seen and time.monotonic() < deadline:
                s.sendall(b"[ -t 0 ] && echo TTY-$((6*7))\n")
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    pass
        assert b"TTY-42" in seen, seen[-300:]
        assert b"TTY-42" in oci_driver.console_log(spec.name), "terminal output is also logged"
    finally:
        oci_driver.delete(spec.name)
    assert not Path(endpoint.path).exists()


def test_a_container_whose_process_exits_is_observed_as_shutdown_and_can_start_again(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec]
) -> None:
    spec = make_container_spec("exits", command=("/bin/sh", "-c", "echo RAN; sleep 0.3"))
    oci_driver.spawn(spec)
    try:
        deadline = time.monotonic() + 10
        while oci_driver.power_state(spec.name) is not PowerState.SHUTDOWN:
            assert time.monotonic() < deadline, "the exit was not observed"
            time.sleep(0.05)
        oci_driver.start(spec.name)
        wait_for_console(lambda: (oci_driver.console_log(spec.name).count(b"RAN") == 2 and b"RAN") or b"", b"RAN")
    finally:
        oci_driver.delete(spec.name)


def test_containers_cannot_live_migrate_and_say_to_restart_on_the_target(oci_driver: OciDriver) -> None:
    with pytest.raises(NotSupported, match="restart it on the target"):
        oci_driver.migrate("any", "qemu+unix:///system")


@pytest.mark.unit
def test_router_sends_each_container_to_the_backend_its_isolation_names() -> None:
    plain, micro = fake_container_driver(), fake_container_driver()
    router = ContainerRouter(plain, micro)
    base = dict(image="/i.tar", command=("/bin/sh",))
    router.spawn(ContainerSpec(name="a", **base))  # type: ignore[arg-type]
    router.spawn(ContainerSpec(name="b", isolation="vm", **base))  # type: ignore[arg-type]
    assert plain.list_instances() == ["a"] and micro.list_instances() == ["b"]
    assert router.list_instances() == ["a", "b"]
    router.pause("b")
    assert micro.power_state("b") is PowerState.PAUSED and router.power_state("a") is PowerState.RUNNING
    with pytest.raises(InstanceExists):
        router.define(ContainerSpec(name="a", isolation="vm", **base))  # type: ignore[arg-type]
    router.delete("b")
    router.delete("b")
    assert router.list_instances() == ["a"]
    with pytest.raises(InstanceNotFound):
        router.start("b")
