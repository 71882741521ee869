"""``isolation: vm`` containers behave like containers (exec, terminal, logs, limits,
stop/start, volumes) through the agent inside their microVM; plain containers get the
same block volumes through a userspace block device."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compute import block_volumes, host_mounts
from compute.guest_agent import FrameReader, T, frame
from compute.oci_driver import OciDriver
from compute.spec import BlockVolume, ContainerNic, ContainerSpec, NbdSource, PowerState, QosClass
from compute.testguest import MARKER
from compute.vm_isolation import VmIsolatedContainerDriver
from tests.compute.conftest import wait_for_console

pytestmark = pytest.mark.functional


@pytest.fixture
def make_export(workdir: Path, prefix: str) -> Iterator[Callable[[str], NbdSource]]:
    """Blank ``nbdkit memory`` exports on unix sockets (standing in for the storage daemon's)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def make(size: str) -> NbdSource:
        sock = workdir / f"{prefix}-vol-{time.monotonic_ns()}.sock"
        proc = subprocess.Popen(["nbdkit", "-f", "--unix", str(sock), "memory", size],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append((proc, sock))
        for _ in range(250):
            if sock.exists():
                break
            time.sleep(0.02)
        assert sock.exists(), "nbdkit did not start"
        return NbdSource(f"nbd+unix:///?socket={sock}")

    yield make
    for proc, sock in procs:
        proc.terminate()
        proc.wait(10)
        sock.unlink(missing_ok=True)


def test_frames_survive_garbage_and_split_reads() -> None:
    """The host resynchronises on the magic after bytes an earlier connection left behind."""
    reader = FrameReader(limit=1024)
    wire = b"\x00\xca garbage" + frame(T.READY, 0, b"abc") + frame(T.STDOUT, 7, b"x" * 100)
    wire += b"\xca\x1f\x15\x00\x00\x00\x01\xff\xff\xff\xff"  # a header claiming a 4 GiB payload
    wire += frame(T.EXIT, 7, b"3")
    got = [f for i in range(0, len(wire), 5) for f in reader.feed(wire[i:i + 5])]
    assert got == [(T.READY, 0, b"abc"), (T.STDOUT, 7, b"x" * 100), (T.EXIT, 7, b"3")]


def test_vm_isolated_container_execs_logs_limits_terminal_network_volume_and_ends_with_its_process(
    vm_isolated_driver: VmIsolatedContainerDriver, oci_driver: OciDriver, bridge: str, prefix: str,
    make_container_spec: Callable[..., ContainerSpec], make_export: Callable[[str], NbdSource],
) -> None:
    net = f"10.79.{secrets.randbelow(200) + 20}"
    tag = secrets.token_hex(1)
    volume = BlockVolume(make_export("64M"), "/var/lib/data", "data")
    isolated = make_container_spec(
        "iso", isolation="vm", tty=True, memory_mib=48, vcpus=0.5, qos_class=QosClass.GUARANTEED,
        env=(("GREETING", "hello"),), block_volumes=(volume,),
        command=("/bin/sh", "-c", "echo IMAGE-$(head -c 4 /etc/group) KERNEL-$(uname -r); exec sh"),
        nics=(ContainerNic(mac=f"52:54:00:dd:00:{tag}", bridge=bridge, host_dev=f"{prefix}i{tag}",
                           address=f"{net}.2/24"),))
    peer = make_container_spec("iso-peer", nics=(ContainerNic(mac=f"52:54:00:dd:01:{tag}", bridge=bridge,
                                                              host_dev=f"{prefix}p{tag}", address=f"{net}.3/24"),))
    oci_driver.spawn(peer)
    name = isolated.name
    try:
        vm_isolated_driver.spawn(isolated)  # returns once the main process runs in the guest
        assert vm_isolated_driver.power_state(name) is PowerState.RUNNING
        wait_for_console(lambda: vm_isolated_driver.console_log(name), b"KERNEL-", timeout=30)
        log = vm_isolated_driver.console_log(name)
        assert b"IMAGE-root" in log, "the command saw the image's /etc/group"
        assert MARKER.encode() not in log, "the container's log holds its output, not the guest kernel's console"
        # exec: exit status, stdout and stderr apart, the container's environment and hostname
        r = vm_isolated_driver.exec(name, ["sh", "-c", "echo $GREETING $(hostname); echo oops >&2; exit 3"])
        assert (r.returncode, r.stdout, r.stderr) == (3, f"hello {name}\n".encode(), b"oops\n")
        assert vm_isolated_driver.exec(name, ["no-such-program"]).returncode == 127
        r = vm_isolated_driver.exec(name, ["sh", "-c", "tty && test -t 0 && echo on-a-tty >&2"], tty=True)
        assert r.returncode == 0 and b"/dev/pts/" in r.stdout and b"on-a-tty" in r.stdout, r
        assert vm_isolated_driver.exec(name, ["test", "-t", "0"]).returncode == 1, "no terminal without tty"
        # limits: the container's cgroup in the guest
        r = vm_isolated_driver.exec(name, ["cat", "/sys/fs/cgroup/container/memory.max",
                                           "/sys/fs/cgroup/container/cpu.max", "/proc/self/cgroup"])
        assert r.stdout.split() == [str(48 << 20).encode(), b"50000", b"100000", b"0::/container"], r
        # the same overlay port: the peer reaches it on the bridge
        deadline = time.monotonic() + 30
        while oci_driver.exec(peer.name, ["ping", "-c", "1", "-W", "1", f"{net}.2"]).returncode != 0:
            assert time.monotonic() < deadline, "the isolated container is not reachable on the bridge"
        # the volume: formatted on first use (ext4, the default), mounted by the guest's agent
        r = vm_isolated_driver.exec(name, ["sh", "-c", "grep /var/lib/data /proc/mounts; echo kept > "
                                                       "/var/lib/data/f; sync"])
        assert r.returncode == 0 and b" ext4 " in r.stdout, r
        # the terminal: a serial-unix endpoint, like a VM's serial port
        tty = next(c for c in vm_isolated_driver.consoles(name) if c.kind == "serial-unix")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(tty.path)
            s.settimeout(0.5)
            s.sendall(b"echo TTY-$((6*7))\n")
            seen, deadline = b"", time.monotonic() + 20
            while b"TTY-42" not in seen and time.monotonic() < deadline:
                try:
                    seen += s.recv(65536)
                except TimeoutError:
                    pass
        assert b"TTY-42" in seen, seen[-300:]
        assert b"TTY-42" in vm_isolated_driver.console_log(name), "terminal output is also logged"
        # (stop and start through the API: tests/appliance/test_live_stack.py, one microVM boot less here)
        # the main process exits: the guest powers off, the container is shut down
        tty = next(c for c in vm_isolated_driver.consoles(name) if c.kind == "serial-unix")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(tty.path)
            s.sendall(b"exit 7\n")
            deadline = time.monotonic() + 30
            while vm_isolated_driver.power_state(name) is not PowerState.SHUTDOWN:
                assert time.monotonic() < deadline, "the guest did not power off after its main process exited"
                time.sleep(0.1)
        assert not [c for c in vm_isolated_driver.consoles(name) if c.kind == "serial-unix"]
    finally:
        vm_isolated_driver.delete(name)
        oci_driver.delete(peer.name)
    assert name not in vm_isolated_driver.list_instances()


def test_a_plain_containers_volume_is_formatted_as_asked_mounted_and_kept_across_restarts(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec],
    make_export: Callable[[str], NbdSource], workdir: Path,
) -> None:
    volume = BlockVolume(make_export("320M"), "/srv/db", "db", fs="xfs")
    spec = make_container_spec("blk", block_volumes=(volume,))
    oci_driver.spawn(spec)
    try:
        r = oci_driver.exec(spec.name, ["sh", "-c", "grep /srv/db /proc/mounts; echo v1 > /srv/db/f; sync"])
        assert r.returncode == 0 and b" xfs " in r.stdout, r
        r = oci_driver.exec(spec.name, ["sh", "-c", "tty; test -t 1 && echo on-a-tty; exit 5"], tty=True)
        assert r.returncode == 5 and b"/dev/pts/" in r.stdout and b"on-a-tty" in r.stdout, r
        oci_driver.stop(spec.name, timeout=1)
        vols = workdir / "oci" / "containers" / spec.name / "volumes"
        assert not host_mounts.loop_devices_of(vols), "stopping gives the loop device back"
        assert not host_mounts.mounts_under(vols), "stopping unmounts the volume and its export"
        oci_driver.start(spec.name)
        assert oci_driver.exec(spec.name, ["cat", "/srv/db/f"]).stdout == b"v1\n"
    finally:
        oci_driver.delete(spec.name)
    # the volume outlives the container, with its filesystem
    with block_volumes.FileExport(volume.source, workdir / f"check-{secrets.token_hex(2)}.img") as exp:
        assert block_volumes.filesystem_of(exp.path) == "xfs"


def test_a_crashed_runs_volume_mounts_are_taken_down_by_the_next_start_and_by_delete(
    oci_driver: OciDriver, make_container_spec: Callable[..., ContainerSpec],
    make_export: Callable[[str], NbdSource], workdir: Path,
) -> None:
    volume = BlockVolume(make_export("64M"), "/data", "d1")
    spec = make_container_spec("crash", block_volumes=(volume,))
    oci_driver.spawn(spec)
    vols = workdir / "oci" / "containers" / spec.name / "volumes"
    run = Path(f"/run/cairn-containers/cairn-{spec.name}")
    try:
        assert oci_driver.exec(spec.name, ["sh", "-c", "echo kept > /data/f; sync"]).returncode == 0
        # the run crashes: the export dies (its FUSE mount answers ENOTCONN), then the container,
        # and the agent restarts knowing nothing (a new driver on the same directory)
        qsd = int((vols / "d1.img.pid").read_text())
        os.kill(qsd, signal.SIGKILL)
        os.kill(oci_driver.pid(spec.name), signal.SIGKILL)
        fresh = OciDriver(workdir / "oci")
        deadline = time.monotonic() + 20
        while fresh.power_state(spec.name) is not PowerState.SHUTDOWN:
            assert time.monotonic() < deadline, "the container did not die"
            time.sleep(0.05)
        assert host_mounts.mounts_under(vols) and host_mounts.loop_devices_of(vols), "the crash left its mounts"
        fresh.start(spec.name)  # takes the stale mounts down and mounts the volume again
        assert fresh.exec(spec.name, ["cat", "/data/f"]).stdout == b"kept\n"
        assert len(host_mounts.loop_devices_of(vols)) == 1 and len(host_mounts.mounts_under(vols)) == 2
        # and again, this time with the container left running: delete takes everything down
        os.kill(int((vols / "d1.img.pid").read_text()), signal.SIGKILL)
        OciDriver(workdir / "oci").delete(spec.name)
        assert not host_mounts.mounts_under(vols) and not host_mounts.loop_devices_of(vols)
        assert not host_mounts.mounts_under(run) and not run.exists()
        assert not [p for p in Path("/proc").glob("[0-9]*") if _cmdline_has(p, str(vols))], "a daemon is left"
    finally:
        oci_driver.delete(spec.name)


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False
