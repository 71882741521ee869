"""Shared fixtures for the compute tests: one libvirt node per session, the tiny guest, unique names.

Everything is created under a per-session directory and with a unique name prefix,
and torn down at the end, also on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from compute.block_volumes import release_under
from compute.libvirt_driver import LibvirtDriver
from compute.libvirt_node import LibvirtNode
from compute.oci_driver import OciDriver
from compute.spec import Consoles, ContainerSpec, KernelBoot, NicSpec, VmSpec
from compute.testguest import TestGuest, ensure_test_guest
from compute.vm_isolation import VmIsolatedContainerDriver
from tests.services import process_started

PREFIX = "cz" + secrets.token_hex(2)  # unique per session: guests, bridges, taps, veths
BOOT_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def prefix() -> str:
    return PREFIX


def sweep_killed_runs() -> None:
    """The work directories of compute test runs that were killed (their owner process is
    gone) still hold running containers and their mounts: delete the containers (which
    unmounts their rootfs, idmapped binds and volumes) and whatever else is mounted there."""
    for owner in Path(tempfile.gettempdir()).glob("cairn-compute-*/owner"):
        pid, started = owner.read_text().split()
        if process_started(int(pid)) == started:
            continue  # a run in progress (another session's)
        d = owner.parent
        if (d / "oci" / "containers").is_dir():
            stale = OciDriver(d / "oci")
            for name in stale.list_instances():
                stale.delete(name)
        release_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    sweep_killed_runs()
    d = Path(tempfile.mkdtemp(prefix=f"cairn-compute-{PREFIX}-"))
    (d / "owner").write_text(f"{os.getpid()} {process_started(os.getpid())}")
    yield d
    release_under(d)  # a failed test's volume mounts, if any
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def guest() -> TestGuest:
    return ensure_test_guest()


@pytest.fixture(scope="session")
def nbd_pki(workdir: Path) -> tuple[Path, Path]:
    """The appliance's NBD certificates: (pki dir to issue server certificates from,
    the client directory node-a's QEMU shows to ``nbds://`` exports)."""
    from appliance.pki import nbd_client_tls

    pki = workdir / "pki"
    return pki, nbd_client_tls(pki, workdir / "nbd-client", "node-a")


@pytest.fixture(scope="session")
def libvirt_node(workdir: Path, nbd_pki: tuple[Path, Path]) -> Iterator[LibvirtNode]:
    node = LibvirtNode(workdir / "nodes", "node-a", nbd_tls_dir=nbd_pki[1])
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def libvirt_node_b(workdir: Path) -> Iterator[LibvirtNode]:
    node = LibvirtNode(workdir / "nodes", "node-b")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="session")
def vm_driver(libvirt_node: LibvirtNode) -> Iterator[LibvirtDriver]:
    driver = LibvirtDriver(libvirt_node.uri, virt_type="auto", migration_host="127.0.0.1")
    yield driver
    for name in driver.list_instances():
        driver.delete(name)
    driver.close()


@pytest.fixture
def make_vm_spec(guest: TestGuest, workdir: Path, prefix: str) -> Callable[..., VmSpec]:
    """Build a tiny-guest spec; ``cmdline`` extras go to the guest's init (see compute.testguest)."""

    def make(name: str, cmdline: str = "", nics: tuple[NicSpec, ...] = (), **kw: object) -> VmSpec:
        full = f"{prefix}-{name}"
        d = workdir / "vms" / full
        return VmSpec(
            name=full, vcpus=int(kw.pop("vcpus", 1)), memory_mib=int(kw.pop("memory_mib", 192)),  # type: ignore[call-overload]
            kernel_boot=KernelBoot(guest.kernel, guest.initrd, f"console=ttyS0 panic=-1 quiet {cmdline}".strip()),
            consoles=Consoles(serial_log=str(d / "serial.log"), serial_socket=str(d / "serial.sock"),
                              vnc=bool(kw.pop("vnc", False))),
            nics=nics, **kw,  # type: ignore[arg-type]
        )

    return make


def wait_for_console(read: Callable[[], bytes], needle: bytes, timeout: float = BOOT_TIMEOUT) -> float:
    """Poll a console until ``needle`` shows up; return seconds waited, fail with the log tail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if needle in read():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"{needle!r} not seen within {timeout}s; console tail: {read()[-800:]!r}")


@pytest.fixture(scope="session")
def oci_driver(workdir: Path) -> Iterator[OciDriver]:
    driver = OciDriver(workdir / "oci")
    yield driver
    for name in driver.list_instances():
        driver.delete(name)


CONTAINER_MARKER = b"CAIRN-CONTAINER-UP"
CONTAINER_LOOP = f'echo {CONTAINER_MARKER.decode()}; trap "exit 0" TERM; while true; do sleep 0.2; done'


@pytest.fixture
def make_container_spec(guest: TestGuest, prefix: str) -> Callable[..., ContainerSpec]:
    """A busybox container from the test OCI archive that prints a marker and idles."""

    def make(name: str, command: tuple[str, ...] = ("/bin/sh", "-c", CONTAINER_LOOP), **kw: Any) -> ContainerSpec:
        return ContainerSpec(name=f"{prefix}-{name}", image=kw.pop("image", guest.oci_archive), command=command,
                             memory_mib=kw.pop("memory_mib", 64), **kw)

    return make


@pytest.fixture
def bridge(prefix: str) -> Iterator[str]:
    """An isolated Linux bridge (no host address, no forwarding) with a unique name."""
    name = f"{prefix}br{secrets.token_hex(1)}"
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")
        idx = ipr.link_lookup(ifname=name)[0]
        ipr.link("set", index=idx, state="up")
    try:
        yield name
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=name):
                ipr.link("del", index=idx)


@pytest.fixture(scope="session")
def vm_isolated_driver(
    vm_driver: LibvirtDriver, guest: TestGuest, workdir: Path
) -> Iterator[VmIsolatedContainerDriver]:
    driver = VmIsolatedContainerDriver(vm_driver, workdir / "vm-isolated", guest.kernel, guest.initrd)
    yield driver
    for name in driver.list_instances():
        driver.delete(name)
